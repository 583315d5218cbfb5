"""ggufllm on Ray Serve, measured on one machine: affinity vs Ray's default router, a replica
killed under load, autoscaling, and aggregate throughput of 1 vs 2 replicas.

Starts a one-node Ray cluster (``num_cpus`` logical CPUs, no dashboard; Serve's HTTP proxy
on 127.0.0.1), deploys
the embedded Gemma 3 270M (or ``--model``) as applications side by side, drives them through
the ``openai`` client, prints the figures, and shuts everything down.

- affinity: ``--docs`` documents x ``--questions`` questions, interleaved (q0 of every
  document, then q1...), sent one at a time to an application with the affine router and
  to one with Ray's default router (the same request alternately to each). Reports the
  share of requests with ``cached_tokens > 0`` (this counts the shared instructions too,
  which every replica holds after its first request) and the share whose document was
  reused (``cached_tokens >= half the prompt``), over all requests and over follow-ups
  (a document's first request is cold on any router).
- kill: 16 concurrent non-streamed requests (and 2 streams); one replica's process gets
  SIGKILL mid-run; counts the answers, checks the streams ended, and times the restart.
- scale: an autoscaling application (1 to 2 replicas, target = N_PARALLEL = 1) under load;
  reports when Ray's state shows the second replica starting and running.
- throughput: generated tokens/s of ``--concurrency`` concurrent requests on 1 and on 2 replicas.

    python benchmarks/ray_affinity.py                       # everything (~5 min on 2 cores)
    python benchmarks/ray_affinity.py --only affinity,kill

``tests/test_ray.py`` runs the same functions with smaller sizes and asserts on them.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import socket
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
# load pushed every 0.5 s for autoscaling decisions where Ray reads these (Ray 2.60 defines
# them but still pushes every AutoscalingConfig.metrics_interval_s, 10 s: a scale-up there
# waits up to 10 s for its first figures)
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")

INSTRUCTIONS = "Answer the question from the document only, in a few words."
TOPICS = ["river", "castle", "engine", "orchard", "harbor", "library", "glacier", "market"]


# -- the cluster ---------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A local Ray cluster with Serve's proxy on a loopback port."""

    url: str
    session_dir: str
    apps: list[str] = field(default_factory=list)

    def deploy(self, apps: dict[str, Any]) -> None:
        """Deploys ``{name: Application}`` at ``/name``, all at once, and waits until they run."""
        from ray import serve

        serve.run_many([serve.RunTarget(app, name=name, route_prefix=f"/{name}")
                        for name, app in apps.items()])
        self.apps.extend(apps)

    def delete(self, name: str) -> None:
        from ray import serve

        serve.delete(name)
        self.apps.remove(name)


@contextmanager
def local_cluster(num_cpus: int = 2) -> Iterator[Cluster]:
    """A one-node Ray cluster, torn down after (Serve, then Ray), checking that none of
    its processes is left."""
    import ray
    from ray import serve

    ray.init(num_cpus=num_cpus, include_dashboard=False,
             log_to_driver=False, logging_level="WARNING")
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield Cluster(f"http://127.0.0.1:{port}", session_dir)
    finally:
        serve.shutdown()
        ray.shutdown()
    deadline = time.monotonic() + 20
    while (left := processes_of(session_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        raise RuntimeError(f"Ray processes left after shutdown: {left}")


def processes_of(marker: str) -> list[int]:
    """PIDs of processes whose command line contains ``marker`` (this cluster's session
    directory, or a replica's process title)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def replica_pids(app: str) -> list[int]:
    """The processes of an application's model replicas (Ray titles them
    ``ray::ServeReplica:APP:LLMReplica``)."""
    return processes_of(f"ServeReplica:{app}:LLMReplica")


def replica_states(app: str) -> dict[str, int]:
    """Ray's count of the application's model replicas by state (RUNNING, STARTING...)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    dep = status.deployments.get("LLMReplica")
    return {str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()} if dep else {}


def make_app(*, replicas: int = 2, routing: str = "affinity", n_parallel: int = 2,
             model: str | None = None, server: Any = None, kv_cache_ram_mb: int | None = None,
             **cluster: Any) -> Any:
    """An application of small replicas: 1 thread, 0.5 logical CPU each, a 2048-token window
    (``kv_cache_ram_mb``: the host-RAM prefix cache, default KV_CACHE_RAM_MB or 1024)."""
    from ggufllm.config import load_settings
    from ggufllm.ray.build import build_app, load_cluster_options

    settings = load_settings(n_threads=1, n_parallel=n_parallel, max_length=2048,
                             # skip the load-time kernel self-test (a child process per replica)
                             cpu_extra_buffers="off", kv_cache_ram_mb=kv_cache_ram_mb)
    options = load_cluster_options(replicas=replicas, routing=routing, replica_cpus=0.5,
                                   **cluster)
    return build_app(model, options=options, settings=settings, server=server)


# -- the workloads -------------------------------------------------------------

def documents(n: int, chars: int) -> list[str]:
    """``n`` distinct documents of about ``chars`` characters."""
    docs = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        lines, j = [f"Report {i} on the {topic}."], 0
        while sum(len(x) + 1 for x in lines) < chars:
            lines.append(f"Item {j} of the {topic} report {i} weighs {(j * 7 + i * 13) % 97 + 3} "
                         f"kg and is kept in room {(j * 5 + i) % 41}.")
            j += 1
        docs.append("\n".join(lines))
    return docs


def question(doc: int, q: int) -> str:
    return f"How much does item {q * 3 + doc} weigh, and in which room is it kept?"


def client(base: str, api_key: str | None = None) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key or "unused", max_retries=0,
                         timeout=300)


@dataclass
class Affinity:
    """One router's run: per request, its document, prompt and cached tokens."""

    records: list[tuple[int, int, int]] = field(default_factory=list)  # (doc, prompt, cached)

    def share(self, pred: Callable[[int, int], bool], followups: bool = False) -> float:
        seen: set[int] = set()
        hits = total = 0
        for doc, prompt, cached in self.records:
            first = doc not in seen
            seen.add(doc)
            if followups and first:
                continue
            total += 1
            hits += pred(prompt, cached)
        return hits / total if total else 0.0

    @property
    def any_cached(self) -> float:
        return self.share(lambda p, c: c > 0)

    @property
    def doc_reused(self) -> float:
        return self.share(lambda p, c: 2 * c >= p)

    @property
    def followups_reused(self) -> float:
        return self.share(lambda p, c: 2 * c >= p, followups=True)

    def line(self, name: str) -> str:
        return (f"{name:>8}: cached_tokens>0 {self.any_cached:.2f}  document reused "
                f"{self.doc_reused:.2f} (follow-ups {self.followups_reused:.2f}) over "
                f"{len(self.records)} requests")


def run_affinity(bases: dict[str, str], n_docs: int = 4, n_questions: int = 6,
                 doc_chars: int = 1200, max_tokens: int = 4,
                 api_key: str | None = None) -> dict[str, Affinity]:
    """Documents x questions, interleaved, one request at a time, the same request sent to
    each application in turn."""
    docs = documents(n_docs, doc_chars)
    clients = {name: client(base, api_key) for name, base in bases.items()}
    results = {name: Affinity() for name in bases}
    for q in range(n_questions):
        for d, doc in enumerate(docs):
            messages = [{"role": "system", "content": INSTRUCTIONS},
                        {"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {question(d, q)}"}]
            for name, c in clients.items():
                r = c.chat.completions.create(model="default", messages=messages,
                                              max_tokens=max_tokens, temperature=0.0)
                details = r.usage.prompt_tokens_details
                cached = details.cached_tokens if details and details.cached_tokens else 0
                results[name].records.append((d, r.usage.prompt_tokens, cached))
    return results


@dataclass
class KillResult:
    answered: int
    sent: int
    killed_pid: int
    streams: list[str]  # how each stream ended: "done" or "error"
    seconds: float
    health_after: dict[str, Any]  # /health once the requests were answered
    restarted_s: float | None


def run_kill(base: str, app: str, n: int = 16, max_tokens: int = 16, kill_after_s: float = 1.5,
             streams: int = 2, stream_tokens: int = 200, restart_timeout_s: float = 90.0,
             api_key: str | None = None, kill_after_answers: int = 0) -> KillResult:
    """``n`` concurrent non-streamed requests (and ``streams`` streams of ``stream_tokens``);
    SIGKILL of one replica process after ``kill_after_s`` (or, with ``kill_after_answers``,
    once that many answers came: the replicas are still full then on a CPU of any speed);
    then waits for Ray's state to show the replicas running again."""
    import httpx

    c = client(base, api_key)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    before = replica_pids(app)
    assert before, f"no replica process of {app} found"
    t0 = time.perf_counter()

    def ask(i: int) -> str:
        r = c.chat.completions.create(
            model="default", max_tokens=max_tokens, temperature=0.0,
            messages=[{"role": "user", "content": f"Count from {i} to {i + 20}, one per line."}])
        return r.choices[0].message.content or ""

    def stream(i: int) -> str:
        body = {"messages": [{"role": "user", "content": f"Write a long story about ship {i}."}],
                "max_tokens": stream_tokens, "stream": True}
        ended = "cut"
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120,
                          headers=headers) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"error"' in line:
                    ended = "error"
                elif line == "data: [DONE]":
                    return ended if ended == "error" else "done"
        return ended

    with cf.ThreadPoolExecutor(n + streams) as pool:
        futures = [pool.submit(ask, i) for i in range(n)]
        stream_futures = [pool.submit(stream, i) for i in range(streams)]
        if kill_after_answers:
            for answered, _ in enumerate(cf.as_completed(futures, timeout=300), 1):
                if answered >= kill_after_answers:
                    break
        else:
            time.sleep(kill_after_s)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        answered = sum(1 for f in futures if f.result(timeout=300) is not None)
        stream_ends = [f.result(timeout=300) for f in stream_futures]
    seconds = time.perf_counter() - t0
    health = httpx.get(f"{base}/health", timeout=30).json()
    restarted = None
    deadline = time.monotonic() + restart_timeout_s
    while time.monotonic() < deadline:
        pids = replica_pids(app)
        if (replica_states(app).get("RUNNING", 0) >= len(before) and victim not in pids
                and len(pids) >= len(before)):
            restarted = time.perf_counter() - t0
            break
        time.sleep(0.5)
    return KillResult(answered, n, victim, stream_ends, seconds, health, restarted)


@dataclass
class ScaleResult:
    seen: list[tuple[float, dict[str, int]]]  # (seconds, Ray's replica states) on each change
    two_running_s: float | None


def run_scale(base: str, app: str, clients_n: int = 4, max_tokens: int = 24,
              timeout_s: float = 90.0) -> ScaleResult:
    """Keeps ``clients_n`` requests running against an application that autoscales from 1
    replica, until Ray's state shows 2 running (or the timeout)."""
    c = client(base)
    stop = time.monotonic() + timeout_s
    seen: list[tuple[float, dict[str, int]]] = []
    t0 = time.perf_counter()
    two_running: float | None = None

    def load(i: int) -> None:
        while time.monotonic() < stop and two_running is None:
            c.chat.completions.create(
                model="default", max_tokens=max_tokens, temperature=0.0,
                messages=[{"role": "user", "content": f"List {max_tokens} animals ({i})."}])

    with cf.ThreadPoolExecutor(clients_n) as pool:
        workers = [pool.submit(load, i) for i in range(clients_n)]
        while time.monotonic() < stop:
            states = replica_states(app)
            if not seen or seen[-1][1] != states:
                seen.append((round(time.perf_counter() - t0, 1), states))
            if states.get("RUNNING", 0) >= 2:
                two_running = time.perf_counter() - t0
                break
            time.sleep(0.25)
        for w in workers:
            w.result()
    return ScaleResult(seen, two_running)


def run_throughput(base: str, concurrency: int = 4, n: int = 8,
                   max_tokens: int = 32) -> float:
    """Generated tokens/s of ``n`` requests, ``concurrency`` at a time."""
    c = client(base)

    def ask(i: int) -> int:
        r = c.chat.completions.create(
            model="default", max_tokens=max_tokens, temperature=0.0,
            messages=[{"role": "user", "content": f"Tell me about the number {i * 17}."}])
        return int(r.usage.completion_tokens)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(ask, range(n)))
    return tokens / (time.perf_counter() - t0)


# -- the command ---------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--only", default="affinity,kill,scale,throughput")
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--doc-chars", type=int, default=1200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--kv-cache-ram-mb", type=int, default=None,
                        help="each replica's host-RAM prefix cache (0: only its slots hold "
                             "documents, as when documents outnumber what a replica can keep)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    report: dict[str, Any] = {}
    t_start = time.perf_counter()
    with local_cluster(args.num_cpus) as cluster:
        print(f"cluster up in {time.perf_counter() - t_start:.1f} s", flush=True)
        if only & {"affinity", "kill"}:
            t = time.perf_counter()
            ram = args.kv_cache_ram_mb
            cluster.deploy({"affine": make_app(model=args.model, kv_cache_ram_mb=ram),
                            "default": make_app(routing="default", model=args.model,
                                                kv_cache_ram_mb=ram)})
            print(f"2 x 2 replicas deployed in {time.perf_counter() - t:.1f} s", flush=True)
        if "affinity" in only:
            t = time.perf_counter()
            res = run_affinity({n: f"{cluster.url}/{n}" for n in ("affine", "default")},
                               args.docs, args.questions, args.doc_chars)
            print(f"affinity ({args.docs} documents x {args.questions} questions, "
                  f"{time.perf_counter() - t:.1f} s):")
            for name, r in res.items():
                print("  " + r.line(name))
            report["affinity"] = {n: {"any_cached": r.any_cached, "doc_reused": r.doc_reused,
                                      "followups_reused": r.followups_reused}
                                  for n, r in res.items()}
        if "kill" in only:
            k = run_kill(f"{cluster.url}/affine", "affine")
            print(f"kill: {k.answered}/{k.sent} answered in {k.seconds:.1f} s, streams ended "
                  f"{k.streams}; replica {k.killed_pid} killed; /health then: "
                  f"{k.health_after}; both running again after "
                  f"{k.restarted_s if k.restarted_s is None else round(k.restarted_s, 1)} s")
            report["kill"] = k.__dict__
        for name in list(cluster.apps):
            cluster.delete(name)
        if "scale" in only:
            cluster.deploy({"scale": make_app(replicas=1, n_parallel=1, min_replicas=1,
                                              max_replicas=2, upscale_delay_s=0.0,
                                              model=args.model)})
            s = run_scale(f"{cluster.url}/scale", "scale")
            print(f"scale: Ray's replica states {s.seen}; 2 running after {s.two_running_s} s")
            report["scale"] = s.__dict__
            cluster.delete("scale")
        if "throughput" in only:
            rates = {}
            for n_rep in (1, 2):
                name = f"tp{n_rep}"
                cluster.deploy({name: make_app(replicas=n_rep, n_parallel=args.concurrency,
                                               model=args.model)})
                run_throughput(f"{cluster.url}/{name}", 1, 1)  # warm
                rates[n_rep] = statistics.median(
                    run_throughput(f"{cluster.url}/{name}", args.concurrency, 2 * args.concurrency)
                    for _ in range(2))
                cluster.delete(name)
            print(f"throughput ({args.concurrency} concurrent, 1 thread a replica): 1 replica "
                  f"{rates[1]:.1f} tok/s, 2 replicas {rates[2]:.1f} tok/s "
                  f"({rates[2] / rates[1]:.2f}x) on {os.cpu_count()} cores")
            report["throughput"] = rates
    print(f"total {time.perf_counter() - t_start:.0f} s; no Ray process left")
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
