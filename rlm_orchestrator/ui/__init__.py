"""The completion viewer: a web page over the local trace store (`rlm-orchestrator ui`, and
`serve`'s `ui_listen`). model.py builds what it shows, app.py serves it, static/ is the page.

Nothing is imported here: `rlm-orchestrator --help` must not load aiohttp.
"""
