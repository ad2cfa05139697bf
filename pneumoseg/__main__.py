from pneumoseg.cli import main

raise SystemExit(main())
