from wanwu.pipeline.cli import main

raise SystemExit(main())
