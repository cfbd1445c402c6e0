"""The benchmarks' reference milter written with purepythonmilter (bench-only).

Every hook continues; end of message adds a header and accepts.
Run: ``bench/.venv-peers/bin/python bench/peers/purepythonmilter_ref.py PORT [--eom-only]``.
"""

import logging
import sys

from purepythonmilter import Accept, AppendHeader, Continue, PurePythonMilter


async def go_on(command) -> Continue:
    return Continue()


async def stamp(command) -> Accept:
    return Accept(manipulations=[AppendHeader(headername="X-Bench", headertext="yes")])


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    hooks = {}
    if "--eom-only" not in sys.argv:
        for name in ("connect", "helo", "mail_from", "rcpt_to", "data", "header"):
            hooks[f"hook_on_{name}"] = go_on
        hooks["hook_on_end_of_headers"] = go_on
        hooks["hook_on_body_chunk"] = go_on
    milter = PurePythonMilter(
        name="reference", hook_on_end_of_message=stamp, can_add_headers=True, **hooks
    )
    milter.run_server(host="127.0.0.1", port=int(sys.argv[1]))
