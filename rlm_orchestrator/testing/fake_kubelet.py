"""A fake kubelet: runs each pod of the fake API server as a real agent process on loopback.

Each pod gets an address of its own in 127.0.0.0/8 (Linux routes all of it to loopback), so
every agent listens on the same port, as pods do. What the kubelet does is modelled where a
provider can see it: the pod's status (scheduled, ContainerCreating, Running, Ready from a
real gRPC probe of the container's health port, Failed with DeadlineExceeded or the agent's
exit code), env from Secrets (a missing one is CreateContainerConfigError), secret and
emptyDir volumes (written to a directory per pod; container paths in the args are mapped to
them), images (unknown: ErrImagePull, then ImagePullBackOff; "never-ready": stuck in
ContainerCreating), and deletion (SIGTERM, the grace period, SIGKILL). Not modelled:
restarts, resource limits, the security context (the process runs as the test's user).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rlm_orchestrator.testing.fake_kube import ApiError, FakeKubeApiServer

JsonObject = dict[str, Any]
AGENT, NEVER_READY, CRASHES = "agent", "never-ready", "crashes"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class _PodStartError(Exception):
    """The container cannot be created: (reason, message) for its waiting state."""


class FakeKubelet:
    def __init__(
        self,
        server: FakeKubeApiServer,
        root: Path,
        *,
        images: dict[str, str] | None = None,
        probe_period_seconds: float = 0.05,
    ) -> None:
        self.server = server
        self.root = root
        # image -> what runs: AGENT (python -m sandbox_agent + the args), NEVER_READY, or
        # CRASHES (a container that exits with code 3 as soon as it starts).
        self.images = images if images is not None else {"rlm-sandbox:latest": AGENT}
        self.probe_period_seconds = probe_period_seconds
        self._addresses = (f"127.77.{n // 250}.{n % 250 + 1}" for n in itertools.count())
        self._pods: dict[str, _RunningPod] = {}
        self._lock = threading.Lock()
        self._stoppers: list[threading.Thread] = []
        self.started = 0  # how many agent processes it has started (for tests)
        server.on_create("Pod", self._on_create)
        server.on_delete("Pod", self._on_delete)

    def _on_create(self, pod: JsonObject) -> None:
        running = _RunningPod(self, pod, next(self._addresses))
        with self._lock:
            self._pods[pod["metadata"]["uid"]] = running
        running.thread.start()

    def _on_delete(self, pod: JsonObject) -> None:
        with self._lock:
            running = self._pods.pop(pod["metadata"]["uid"], None)
        if running is not None:
            # The API answers at once; the kubelet stops the container in its own time.
            stopper = threading.Thread(target=running.stop, daemon=True)
            self._stoppers.append(stopper)
            stopper.start()

    def running_processes(self) -> int:
        with self._lock:
            return sum(
                1
                for pod in self._pods.values()
                if pod.process is not None and pod.process.poll() is None
            )

    def close(self) -> None:
        with self._lock:
            pods, self._pods = list(self._pods.values()), {}
        for running in pods:
            running.stop()
        for stopper in self._stoppers:
            stopper.join()


class _RunningPod:
    def __init__(self, kubelet: FakeKubelet, pod: JsonObject, ip: str) -> None:
        self.kubelet = kubelet
        self.pod = pod
        self.ip = ip
        self.namespace = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.dir = kubelet.root / pod["metadata"]["uid"]
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"kubelet-{self.name}", daemon=True)

    # -- status -------------------------------------------------------------------------

    def _status(
        self, phase: str, container_state: JsonObject, ready: bool = False, **extra: Any
    ) -> None:
        status: JsonObject = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": _now(),
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True" if ready else "False"},
            ],
            "containerStatuses": [
                {
                    "name": "agent",
                    "image": self.pod["spec"]["containers"][0]["image"],
                    "ready": ready,
                    "restartCount": 0,
                    "state": container_state,
                }
            ],
            **extra,
        }
        if self.stopping.is_set():
            return
        with contextlib.suppress(ApiError):  # deleted meanwhile
            self.kubelet.server.set_pod_status(self.namespace, self.name, status)

    def _waiting(self, reason: str, message: str = "") -> None:
        self._status("Pending", {"waiting": {"reason": reason, "message": message}})

    # -- lifecycle ----------------------------------------------------------------------

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        container = self.pod["spec"]["containers"][0]
        self._waiting("ContainerCreating")
        behaviour = self.kubelet.images.get(container["image"])
        if behaviour is None:
            message = f'failed to pull image "{container["image"]}": not found'
            self._waiting("ErrImagePull", message)
            if not self.stopping.wait(0.2):
                self._waiting("ImagePullBackOff", f'Back-off pulling image "{container["image"]}"')
            return
        if behaviour == NEVER_READY:
            return
        try:
            env = self._env(container)
            mounts = self._volumes(container)
        except _PodStartError as exc:
            reason, message = exc.args
            self._waiting(reason, message)
            return
        self._start(container, env, mounts, crash=behaviour == CRASHES)

    def _start(
        self, container: JsonObject, env: dict[str, str], mounts: dict[str, Path], crash: bool
    ) -> None:
        args = [self._map(arg, mounts) for arg in container.get("args", [])]
        command = [sys.executable, "-m", "sandbox_agent", *args]
        if crash:
            command = [sys.executable, "-c", "raise SystemExit(3)"]
        # Only what the pod spec gives, plus the test run's owner label (its leak checks).
        base = {key: os.environ[key] for key in ("PATH", "RLM_SANDBOX_OWNER") if key in os.environ}
        log = (self.dir / "agent.log").open("wb")
        with log:
            self.process = subprocess.Popen(
                command, env={**base, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
            )
        self.kubelet.started += 1
        started = time.monotonic()
        self._status("Running", {"running": {"startedAt": _now()}})
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        probe = container.get("readinessProbe", {}).get("grpc")
        ready = False
        while not self.stopping.is_set():
            code = self.process.poll()
            if code is not None:
                phase = "Succeeded" if code == 0 else "Failed"
                reason = "Completed" if code == 0 else "Error"
                self._status(phase, {"terminated": {"exitCode": code, "reason": reason}})
                return
            if deadline is not None and time.monotonic() - started > deadline:
                self._kill(grace=0)
                self._status(
                    "Failed",
                    {"terminated": {"exitCode": 137, "reason": "Error"}},
                    reason="DeadlineExceeded",
                    message="Pod was active on the node longer than the specified deadline",
                )
                return
            if probe and not ready and self._probe(int(probe["port"])):
                ready = True
                self._status("Running", {"running": {"startedAt": _now()}}, ready=True)
            self.stopping.wait(self.kubelet.probe_period_seconds)

    def _probe(self, port: int) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"{self.ip}:{port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def _env(self, container: JsonObject) -> dict[str, str]:
        env = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = item["valueFrom"]["secretKeyRef"]
            data = self._secret_data(ref["name"], "CreateContainerConfigError")
            if ref["key"] not in data:
                raise _PodStartError(
                    "CreateContainerConfigError",
                    f"couldn't find key {ref['key']} in Secret {self.namespace}/{ref['name']}",
                )
            env[item["name"]] = data[ref["key"]].decode()
        return env

    def _secret_data(self, name: str, reason: str) -> dict[str, bytes]:
        try:
            secret = self.kubelet.server.get("Secret", self.namespace, name)
        except ApiError:
            raise _PodStartError(reason, f'secret "{name}" not found') from None
        return {key: base64.b64decode(value) for key, value in secret.get("data", {}).items()}

    def _volumes(self, container: JsonObject) -> dict[str, Path]:
        """Each mount's container path -> the directory standing in for it."""
        volumes = {volume["name"]: volume for volume in self.pod["spec"].get("volumes", [])}
        mounts = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            path = self.dir / "volumes" / mount["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:
                source = volume["secret"]
                data = self._secret_data(source["secretName"], "CreateContainerConfigError")
                items = source.get("items") or [{"key": key, "path": key} for key in data]
                for item in items:
                    target = path / item["path"]
                    target.write_bytes(data[item["key"]])
                    target.chmod(0o600)
            mounts[mount["mountPath"]] = path
        return mounts

    def _map(self, arg: str, mounts: dict[str, Path]) -> str:
        if arg.startswith("0.0.0.0:"):
            return self.ip + arg.removeprefix("0.0.0.0")  # the pod's own address
        for container_path in sorted(mounts, key=len, reverse=True):
            if arg == container_path or arg.startswith(container_path.rstrip("/") + "/"):
                return str(mounts[container_path]) + arg[len(container_path.rstrip("/")) :]
        return arg

    def _kill(self, grace: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self._kill(grace=float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
        shutil.rmtree(self.dir, ignore_errors=True)
