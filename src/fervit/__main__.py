from fervit.cli import main

raise SystemExit(main())
