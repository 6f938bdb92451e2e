"""Messages of rlm_wire.v1 to and from the orchestrator's Python types, both directions in one
place so that the server and the client SDK cannot drift apart: `events` (completion events,
answer parts), `usage` (usage accounting). Imported by the server and by the SDK, which must
not import the server (`rlm_orchestrator.service`)."""
