"""``python -m wanwu.pipeline.workers ROLE INDEX``: one worker process (see ``base.main``)."""

from wanwu.pipeline.workers.base import main

raise SystemExit(main())
