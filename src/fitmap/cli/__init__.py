"""``fitmap`` command line: parse strings once, call the pipeline, print tables or JSON.

Exit codes: 0 success, 2 bad input or a request that does not fit (one message on
stderr, no traceback), 1 an unexpected error (a bug: traceback kept).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from fitmap.cli.parser import build_parser, negative_values_attached
from fitmap.cli.plan_commands import cmd_check, cmd_inspect, cmd_plan
from fitmap.cli.run_commands import cmd_calibrate, cmd_chat, cmd_demo, cmd_run, cmd_serve
from fitmap.errors import FitmapError

HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "inspect": cmd_inspect,
    "plan": cmd_plan,
    "check": cmd_check,
    "run": cmd_run,
    "chat": cmd_chat,
    "demo": cmd_demo,
    "calibrate": cmd_calibrate,
    "serve": cmd_serve,
}


def quiet_third_parties() -> None:
    """A user sees fitmap's lines only: torch's and transformers' warnings, transformers' logs
    below errors, hub progress bars and what model code prints while it is built are hidden
    (``fitmap --verbose`` shows them)."""
    import logging
    import warnings

    from fitmap.model import build

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "pip install kernels" notes at import
    logging.getLogger("kernels").setLevel(logging.ERROR)  # bitsandbytes' import fetches a CPU kernel through
    # the kernels package, whose hf_hub logs "Skipping publisher trust check for ..." (offline) as a warning
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)  # a fake op's own traceback:
    # the simulation says in one line which op and source line stopped it
    build.MODEL_PRINTS = False  # remote code's print()s while it is built ("Flash attention is not ...")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    argv = negative_values_attached(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_third_parties()
    try:
        return HANDLERS[args.command](args)
    except FitmapError as e:
        if e.exit_code or str(e):  # exit 0 with nothing to say: a pipeline stage that ran to the end
            print(f"fitmap {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from fitmap.errors import ModelCodeError

        if not ModelCodeError.raised_in_model_code(e):
            raise
        print(f"fitmap {args.command}: {ModelCodeError.from_exception(f'running {args.command}', e)}", file=sys.stderr)
        return ModelCodeError.exit_code
