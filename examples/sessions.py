"""A session: one sandbox kept across completions, so variables persist between questions.

    RLM_SERVER=127.0.0.1:50051 RLM_SERVER_TOKEN=... python examples/sessions.py

The first completion's context is `context` (alias `context_0`), the next ones' `context_1`,
`context_2`, ...; the options given to create_session apply to each of its completions.
"""

from __future__ import annotations

import os

from rlm_orchestrator.client import Client, NotFoundError


def main() -> None:
    with Client(os.environ.get("RLM_SERVER", "127.0.0.1:50051")) as client:
        with client.create_session(max_iterations=5) as session:
            print("session", session.session_id)
            first = session.completion("one two three", "Count the words and remember it.")
            print("first:", first.response)
            second = session.completion(
                "one two three four five six", "How many words more than the first text?"
            )
            print("second:", second.response)
        # Closed: the server released its sandbox, and the id is gone.
        try:
            client.close_session(session.session_id)
        except NotFoundError as exc:
            print("closed:", exc)


if __name__ == "__main__":
    main()
