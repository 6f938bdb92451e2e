"""The wire between the orchestrator, its client SDK and the sandbox agents.

`rlm_wire.v1`: the code generated from protos/rlm/v1 (`make proto`), every service's.
`rlm_wire.auth`, `rlm_wire.decoding`, `rlm_wire.status`: what every gRPC server and client of
ours shares (bearer token and TLS; INVALID_ARGUMENT for undecodable requests; handlers' errors
ending calls with their status).

Public, so that each side imports it by name and none imports another's package: the agent,
the orchestrator server and the SDK all depend on this one. grpc, protobuf and the standard
library only (the agent imports it); nothing here may import rlm_orchestrator or sandbox_agent.
"""

# The files of this package the sandbox agent imports (paths relative to this directory): its
# own service's generated code and the shared interceptors. The agent's images carry only these
# (deploy/build-sandbox-image.sh, the Modal provider); tests/test_import_rules.py checks that
# the agent imports nothing else from here.
AGENT_FILES = (
    "__init__.py",
    "auth.py",
    "decoding.py",
    "status.py",
    "v1/__init__.py",
    "v1/sandbox_pb2.py",
    "v1/sandbox_pb2_grpc.py",
)
