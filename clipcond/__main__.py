from clipcond.cli import main

raise SystemExit(main())
