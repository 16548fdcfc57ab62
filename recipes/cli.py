"""How every recipe command ends on a user's mistake (a wrong config key, a missing file, unusable data): one line
`error: ...` on stderr and exit status 2, never a traceback, and under the DeepSpeed launcher one report, not one
per rank. Tracebacks stay for bugs."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, NoReturn

# A mistake met at start-up is met alike by every rank: rank 0 reports it and exits, and the launcher (which polls
# its ranks every second) stops the others while they wait this long. A mistake only one other rank met (its data)
# is still reported, after the wait.
OTHER_RANKS_WAIT_S = 3.0


def exit_on_user_errors(main: Callable[[], int], user_errors: tuple[type[BaseException], ...]) -> NoReturn:
    """`raise SystemExit(main())`, with `user_errors` turned into the one-line report and exit status 2."""
    try:
        code = main()
    except user_errors as e:
        rank = int(os.environ.get("RANK") or 0)
        if rank:
            time.sleep(OTHER_RANKS_WAIT_S)
        print(f"error: {'' if rank == 0 else f'[rank {rank}] '}{e}", file=sys.stderr, flush=True)
        code = 2
    raise SystemExit(code)
