"""VideoLLaMB proxy: SceneTilling and a recurrent KV memory over segments (`method.py`)."""
