"""A fake kubelet: runs each pod of the fake API server as a real agent process on loopback.

Each pod gets an address of its own in 127.0.0.0/8 (Linux routes all of it to loopback), so
every agent listens on the same port, as pods do. What the kubelet does is modelled where a
provider can see it: the pod's status (scheduled, ContainerCreating, Running, Ready from a
real gRPC probe of the container's health port, Failed with DeadlineExceeded or the agent's
exit code), env from Secrets (a missing one is CreateContainerConfigError), secret and
emptyDir volumes (written to a directory per pod; container paths in the args are mapped to
them), images (unknown: ErrImagePull, then ImagePullBackOff; "never-ready": stuck in
ContainerCreating), and graceful deletion: each pod is bound to the kubelet's node at once
(``spec.nodeName``), so the API server only marks a deleted pod (deletionTimestamp); the
kubelet then sends SIGTERM, SIGKILL after the pod's deletionGracePeriodSeconds, reports the
container's exit, and deletes the pod for good (grace 0). ``hold_terminations`` keeps deleted
pods running and Terminating, as a slow kubelet or a node that stopped answering does. Not
modelled: restarts, resource limits, the security context (the process runs as the test's
user).
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.fakes.fake_kube import ApiError, FakeKubeApiServer

JsonObject = dict[str, Any]
AGENT, NEVER_READY, CRASHES = "agent", "never-ready", "crashes"
STUBBORN = "stubborn"  # a container that ignores SIGTERM (it only goes at SIGKILL)
_COMMANDS = {
    CRASHES: "raise SystemExit(3)",
    # It says when SIGTERM is ignored (a file in its directory): a SIGTERM before that kills it.
    STUBBORN: "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open('ignoring-sigterm', 'w').close(); time.sleep(3600)",
}

# One sequence for every kubelet in the process: a pod of an earlier kubelet may still be
# exiting on its address, and a new agent there would fail to bind.
_ADDRESSES = (f"127.77.{n // 250 % 250}.{n % 250 + 1}" for n in itertools.count())


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
        # CRASHES (a container that exits with code 3 as soon as it starts), or STUBBORN.
        self.images = images if images is not None else {"rlm-sandbox:latest": AGENT}
        self.probe_period_seconds = probe_period_seconds
        self.node_name = "fake-node"
        self._addresses = _ADDRESSES
        self._pods: dict[str, _RunningPod] = {}  # by uid, until their processes are stopped
        self._lock = threading.Lock()
        self._stoppers: list[threading.Thread] = []
        self._proceed = threading.Event()  # cleared: deleted pods are left Terminating
        self._proceed.set()
        self.started = 0  # how many agent processes it has started (for tests)
        server.on_create("Pod", self._on_create)
        server.on_terminate("Pod", self._on_terminate)
        server.on_delete("Pod", self._on_delete)

    def _on_create(self, pod: JsonObject) -> None:
        meta = pod["metadata"]
        try:  # scheduled here at once (the scheduler's binding): its deletion is graceful now
            pod = self.server.update(
                "Pod",
                meta["namespace"],
                meta["name"],
                lambda p: p["spec"].update(nodeName=self.node_name),
            )
        except ApiError:
            return  # deleted meanwhile
        running = _RunningPod(self, pod, next(self._addresses))
        with self._lock:
            self._pods[meta["uid"]] = running
        running.thread.start()

    def _on_terminate(self, pod: JsonObject) -> None:
        with self._lock:
            running = self._pods.get(pod["metadata"]["uid"])
            if running is None or running.terminating:
                return  # not ours, or a shortened grace: the stop under way stands
            running.terminating = True
        self._in_background(self._terminate, running, pod["metadata"]["deletionGracePeriodSeconds"])

    def _terminate(self, running: _RunningPod, grace: float) -> None:
        """A graceful deletion, as the kubelet does it: the container stopped (SIGTERM, SIGKILL
        after the grace), its exit reported, then the pod deleted for good."""
        self._proceed.wait()
        running.stop(grace)
        running.report_exit()
        with contextlib.suppress(ApiError):  # force-deleted meanwhile
            self.server.delete(
                "Pod",
                running.namespace,
                running.name,
                grace_period_seconds=0,
                preconditions={"uid": running.uid},
            )
        with self._lock:
            self._pods.pop(running.uid, None)

    def _on_delete(self, pod: JsonObject) -> None:
        with self._lock:
            running = self._pods.get(pod["metadata"]["uid"])
            if running is None or running.terminating:
                return  # not ours, or its termination deleted it (or will stop it)
            del self._pods[running.uid]
        # Gone without a graceful deletion (forced, or not running): stopped in the background.
        self._in_background(running.stop, running.grace_seconds)

    def _in_background(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._stoppers.append(thread)
        thread.start()

    @contextlib.contextmanager
    def hold_terminations(self) -> Iterator[None]:
        """Pods deleted meanwhile keep running and stay Terminating (deletionTimestamp set)
        until the block ends, as with a slow kubelet or a node that stopped answering."""
        self._proceed.clear()
        try:
            yield
        finally:
            self._proceed.set()

    def running_processes(self) -> int:
        with self._lock:
            return sum(
                1
                for pod in self._pods.values()
                if pod.process is not None and pod.process.poll() is None
            )

    def close(self) -> None:
        self._proceed.set()
        with self._lock:
            pods = list(self._pods.values())
        for running in pods:
            running.stop(running.grace_seconds)
        with self._lock:
            stoppers = list(self._stoppers)
        for stopper in stoppers:
            stopper.join()
        with self._lock:
            self._pods.clear()


class _RunningPod:
    def __init__(self, kubelet: FakeKubelet, pod: JsonObject, ip: str) -> None:
        self.kubelet = kubelet
        self.pod = pod
        self.ip = ip
        self.namespace = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.uid = pod["metadata"]["uid"]
        self.dir = kubelet.root / self.uid
        self.grace_seconds = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.terminating = False  # a graceful deletion is under way (the kubelet's lock)
        self._stop_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"kubelet-{self.name}", daemon=True)

    # -- status -------------------------------------------------------------------------

    def _status(
        self,
        phase: str,
        container_state: JsonObject,
        ready: bool = False,
        final: bool = False,  # the exit of a stopped container (reported after stopping)
        **extra: Any,
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
        if self.stopping.is_set() and not final:
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
        self._start(container, env, mounts, _COMMANDS.get(behaviour))

    def _start(
        self,
        container: JsonObject,
        env: dict[str, str],
        mounts: dict[str, Path],
        replacement: str | None,  # Python code that runs instead of the agent
    ) -> None:
        args = [self._map(arg, mounts) for arg in container.get("args", [])]
        command = [sys.executable, "-m", "sandbox_agent", *args]
        if replacement is not None:
            command = [sys.executable, "-c", replacement]
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

    def stop(self, grace: float) -> None:
        with self._stop_lock:
            self.stopping.set()
            self.thread.join()
            self._kill(grace)
            shutil.rmtree(self.dir, ignore_errors=True)

    def report_exit(self) -> None:
        """The container's end, after it was stopped: terminated, not ready."""
        code = self.process.poll() if self.process is not None else None
        if code is None:
            return  # it never ran
        code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number
        state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}
        self._status("Succeeded" if code == 0 else "Failed", state, final=True)
