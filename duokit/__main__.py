from duokit.cli import main

raise SystemExit(main())
