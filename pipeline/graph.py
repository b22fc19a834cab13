"""The shape of a run, in one place: the stages, the links between them (socket kinds, which side binds,
high-water mark, what happens when full), the frame ring with its back-channel, and the counters each
boundary owns. The supervisor builds a run from a `Graph`; stages open their sockets from it; frame
accounting (read = scored + dropped) is derived from it.

    capture --frames (push, newest wins)--> preprocess --inputs (infer pulls work)--> infer
        |                                                                              |
        +== ring slot: capture writes; preprocess marks consumed, postprocess marks released ==+
                                                              infer --results (push, waits)--> postprocess

A graph is data: several infer workers are `replicas`; workers on other machines connect to a work
link's `remote` endpoint and return results over it, which preprocess relays on `remote_results`
(`replicas` counts the local ones only, and may be 0); a screening cascade is one more infer stage (its
own bundle) with links of its own: the screen's work link serves the newest frames, the main model's serves
only the frames postprocess asks for. The stages do not change for any of these.

    screening cascade:  preprocess --screen_inputs (newest)--> screen --screened--> postprocess
                        preprocess --inputs (refined only)---> infer  --results---> postprocess
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from .messages import Kind

Side = Literal["sender", "receiver"]

# Frames a flooded recording may be ahead of the ring's first reader: as fast as the pipeline goes, without
# producing frames only to drop them (all of them get processed; see Ring).
FLOOD_IN_FLIGHT = 4

# A live source's running totals, kept by capture (pipeline.sources): times the stream was lost and came
# back, frames its newest-frame reader replaced before capture took them, frames held back until the
# imaging sector was found. None of them was read, so none enters read = scored + dropped.
SOURCE_COUNTERS = ("reconnects", "reconnected", "source_overwritten", "roi_withheld")
# Counters every stage may keep: frames taken in, handed on, and messages refused as malformed.
COMMON_COUNTERS = ("received", "sent", "rejected")


@dataclass(frozen=True)
class Link:
    """One data connection between two stages.

    `pattern` push: the sender PUSHes, the receiver PULLs. `pattern` work: the receivers are DEALERs that
    ask for work (`want n`) and the sender is a ROUTER that answers each with at most n frames, so work
    goes to whichever worker is idle and never waits in a socket queue behind newer frames.
    `hwm` "transport" is the run's `transport.hwm`; "batch" is enough for one batch of `infer.max_batch`
    (a batch's messages leave together and the mark must not cut its tail off).
    """

    name: str
    sender: str
    receiver: str
    carries: Kind
    pattern: Literal["push", "work"]
    bound_by: Side
    hwm: Literal["transport", "batch"]
    backpressure: str  # what happens when the receiver is behind, in words (for --describe and docs)
    drops: tuple[tuple[str, str], ...]  # (stage, counter): the places this boundary loses frames
    endpoint: str | None = None  # a fixed endpoint (remote workers); None: ipc in the run's socket folder
    # Work links: a TCP endpoint the sender's ROUTER also binds for workers on other machines (Curve when
    # the run has keys). They ask for work and return results over that one connection; the sender
    # relays the results on its RESULT link (so it alone can tell a returned frame from a lost one).
    remote: str | None = None
    sent_counter: str = "sent"  # the sender's counter of what crossed this link (a relay counts its own)
    # Which frames: "newest" (the live path), "refined" (only frames postprocess asked for: extra to the
    # frame accounting), or "all".
    serves: Literal["all", "newest", "refined"] = "all"

    @property
    def carries_frames(self) -> bool:
        """Whether the stream's frames cross this link (and are accounted at its boundary), not requests
        about them or refined frames only."""
        return self.carries in (Kind.FRAME, Kind.INPUT, Kind.RESULT) and self.serves != "refined"

    @property
    def boundary(self) -> str:
        """The boundary's name in summaries and health events: "sender>receiver"."""
        return f"{self.sender}>{self.receiver}"

    def side(self, stage: str) -> Side:
        if stage == self.sender:
            return "sender"
        if stage == self.receiver:
            return "receiver"
        raise KeyError(f"stage {stage!r} is not on link {self.name!r}")


@dataclass(frozen=True)
class Ring:
    """The shared-memory frame ring and its back-channel: the only path that is not a socket. The first
    reader marks the frames it is done with (`mark_consumed`), the last reader those it released
    (`mark_released`); the writer reads both marks before reusing a slot in lossless and flooded runs."""

    writer: str
    first_reader: str
    last_reader: str


@dataclass(frozen=True)
class StageSpec:
    """One stage of the graph. `role` names the stage class (`pipeline.stages.ROLES`); `counters` are the
    stage's own figures beyond the common ones and the drops its boundaries declare."""

    name: str
    role: str
    counters: tuple[str, ...] = ()
    replicas: int = 1  # processes of this stage on this host
    bundle: Literal["main", "screen"] = "main"  # the model it runs: infer.bundle or infer.screen_bundle

    def instances(self) -> list[str]:
        """Process names: the stage's name, or name-0, name-1, ... for a replicated stage."""
        return [self.name] if self.replicas == 1 else [f"{self.name}-{i}" for i in range(self.replicas)]


@dataclass(frozen=True)
class Graph:
    stages: tuple[StageSpec, ...]
    links: tuple[Link, ...]
    ring: Ring
    # Where the run's frames are counted in and out, for the accounting read = scored + dropped.
    counted_in: tuple[str, str] = ("capture", "read")
    counted_out: tuple[str, str] = ("postprocess", "scored")

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"graph: stage names repeat: {names}")
        for link in self.links:
            for end in (link.sender, link.receiver):
                if end not in names:
                    raise ValueError(f"graph: link {link.name!r} names unknown stage {end!r}")
            for stage, _ in link.drops:
                if stage not in (link.sender, link.receiver):
                    raise ValueError(f"graph: link {link.name!r} counts drops in {stage!r}, not on it")

    @property
    def source(self) -> StageSpec:
        """The stage that starts the stream (told `go` and `drain` by the supervisor)."""
        return self.stages[0]

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def link(self, name: str) -> Link:
        return next(link for link in self.links if link.name == name)

    def links_of(self, stage: str) -> Iterator[Link]:
        return (link for link in self.links if stage in (link.sender, link.receiver))

    def links_into(self, stage: str, carries: Kind) -> list[Link]:
        return [link for link in self.links if link.receiver == stage and link.carries is carries]

    def links_from(self, stage: str, carries: Kind) -> list[Link]:
        return [link for link in self.links if link.sender == stage and link.carries is carries]

    def counters_of(self, stage: str) -> frozenset[str]:
        """Every counter `stage` may increment: the common ones, its own, and its boundaries' drops."""
        drops = {key for link in self.links for name, key in link.drops if name == stage}
        return frozenset((*COMMON_COUNTERS, *self.stage(stage).counters, *drops))

    def describe(self) -> dict[str, object]:
        """The run's shape as plain data, written into summary.json so a reader sees what ran."""
        return {
            "stages": {s.name: {"role": s.role, "bundle": s.bundle, "processes": s.instances()}
                       for s in self.stages},
            "links": {link.name: {"from": link.sender, "to": link.receiver, "carries": link.carries.value,
                                  "pattern": link.pattern, "serves": link.serves, "remote": link.remote,
                                  "bound_by": link.bound_by, "hwm": link.hwm,
                                  "backpressure": link.backpressure,
                                  "drops": [f"{stage}.{key}" for stage, key in link.drops]}
                      for link in self.links},
            "ring": {"writer": self.ring.writer, "consumed_by": self.ring.first_reader,
                     "released_by": self.ring.last_reader},
        }


class StageCounters(Counter):
    """A stage's counters, refusing any name the graph does not declare for it: a figure that no boundary
    accounts for would silently unbalance read = scored + dropped."""

    def __init__(self, stage: str, declared: frozenset[str]) -> None:
        super().__init__()
        self.stage = stage
        self.declared = declared

    def __setitem__(self, key: str, value: int) -> None:
        if key not in self.declared:
            raise KeyError(f"stage {self.stage!r} counts {key!r}, which the graph does not declare")
        super().__setitem__(key, value)


def sum_counters(per_instance: dict[str, dict[str, int]], graph: Graph) -> dict[str, dict[str, int]]:
    """Counters per stage of the graph, replicas added up."""
    out: dict[str, dict[str, int]] = {}
    for spec in graph.stages:
        total: Counter[str] = Counter()
        for name in spec.instances():
            total.update(per_instance.get(name, {}))
        out[spec.name] = dict(total)
    return out


def frame_accounting(counters: dict[str, dict[str, int]], graph: Graph) -> dict:
    """Per-boundary counts from the stages' counters (replicas summed); `balanced` says read == scored +
    dropped. A message refused as malformed anywhere is a dropped frame too."""
    def get(stage: str, key: str) -> int:
        return int(counters.get(stage, {}).get(key, 0))

    boundaries = {}
    for link in (link for link in graph.links if link.carries_frames):
        drops = {f"{stage}.{key}": get(stage, key) for stage, key in link.drops}
        boundaries[link.boundary] = {"sent": get(link.sender, link.sent_counter),
                                     "dropped": sum(drops.values()),
                                     "drops": drops}
    read, scored = get(*graph.counted_in), get(*graph.counted_out)
    rejected = sum(get(spec.name, "rejected") for spec in graph.stages)
    dropped = sum(b["dropped"] for b in boundaries.values()) + rejected
    return {"read": read, "scored": scored, "dropped": dropped, "balanced": read == scored + dropped,
            "boundaries": boundaries}


ENGINE_COUNTERS = ("refine_engine_timeout", "engine_reconnects", "engine_unreachable")
"""An infer stage's refined frames lost to an engine timeout: outside the frame accounting, as refined frames
are (the newest ones lost count as drop_engine_timeout at the link into the stage)."""


def pipeline_graph(infer_workers: int = 1, inputs_endpoint: str | None = None, refine: bool = True,
                   screen: bool = False, remote: str | None = None) -> Graph:
    """The four-stage pipeline. `infer_workers` local infer processes share the work (0: none, only remote
    ones); `inputs_endpoint` fixes where preprocess serves work to local workers; `remote` is the TCP
    endpoint where workers on other machines get the main model's work and return its results (relayed
    by preprocess, `remote_results`); `refine` adds the back link on which postprocess asks preprocess
    for frames to score late (pipeline.refine); `screen` adds the screening stage (a fast bundle scoring
    the newest frames), leaving the main model the frames postprocess asks for (a screening cascade;
    needs `refine`)."""
    if infer_workers == 0 and remote is None:
        raise ValueError("graph: no local infer worker and no remote endpoint: nothing would score")
    if screen and not refine:
        raise ValueError("graph: a screening cascade needs the refine link (its main model scores only "
                         "the frames postprocess asks for)")
    newest = "screen" if screen else "infer"
    held = Link(
        "screen_inputs" if screen else "inputs", "preprocess", newest, Kind.INPUT, "work",
        bound_by="sender", hwm="batch", serves="newest" if screen else "all",
        backpressure="preprocess holds the newest prepared frames, one batch's worth, until a "
                     "worker asks (older ones: drop_held); a worker gone with its frames: "
                     "drop_send_full; a batch the engine did not answer in time (a remote server slow or "
                     "gone): drop_engine_timeout",
        drops=(("preprocess", "drop_held"), ("preprocess", "drop_send_full"), (newest, "drop_stale"),
               (newest, "drop_engine_timeout"),
               *([("preprocess", "drop_worker_lost")] if remote and not screen else [])),
        endpoint=None if screen else inputs_endpoint, remote=None if screen else remote)
    links = [
        Link("frames", "capture", "preprocess", Kind.FRAME, "push", bound_by="sender", hwm="transport",
             backpressure="capture never waits on a live source (a full queue is a counted drop); "
                           "preprocess keeps only the newest frame waiting (older ones: drop_stale); a "
                           "frame whose ring slot was overwritten before it was read: drop_overwritten",
             drops=(("capture", "drop_send_full"), ("preprocess", "drop_stale"),
                    ("preprocess", "drop_overwritten"))),
        held,
    ]
    if screen or infer_workers:
        links.append(Link(
            "screened" if screen else "results", newest, "postprocess", Kind.RESULT, "push",
            bound_by="receiver", hwm="batch",
            backpressure="infer waits for postprocess (a result already paid for is not thrown away), "
                         "which slows its asking, so preprocess drops the oldest unscored frames",
            drops=((newest, "drop_send_full"), ("postprocess", "drop_stale"))))
    if screen:
        links.append(
            Link("inputs", "preprocess", "infer", Kind.INPUT, "work", bound_by="sender", hwm="batch",
                 serves="refined", endpoint=inputs_endpoint, remote=remote,
                 backpressure="the main model is sent only the frames postprocess asked for, when it asks; "
                              "they are extra to the frame accounting (a worker gone with them: "
                              "refine_gone)",
                 drops=()))
        if infer_workers:
            links.append(
                Link("results", "infer", "postprocess", Kind.RESULT, "push", bound_by="receiver",
                     hwm="batch", serves="refined", drops=(),
                     backpressure="infer waits for postprocess; refined results are extra to the "
                                  "accounting"))
    if remote:
        links.append(Link(
            "remote_results", "preprocess", "postprocess", Kind.RESULT, "push", bound_by="receiver",
            hwm="batch", serves="refined" if screen else "all", sent_counter="relayed",
            backpressure="results of remote workers, relayed by preprocess as they come back (waiting "
                         "for postprocess like infer does); one for a frame not handed to that worker, "
                         "or no longer awaited, is refused (remote_late)",
            drops=(("postprocess", "drop_stale"),)))
    if refine:
        links.append(Link(
            "refine", "postprocess", "preprocess", Kind.REFINE, "push", bound_by="receiver", hwm="transport",
            backpressure="each request replaces the one before, so a full queue loses nothing that the next "
                         "request does not carry (counted: refine_requests_lost); refined frames are extra "
                         "to the frame accounting (preprocess refine_sent, postprocess refined)",
            drops=()))
    # The main model's own counts where its link is outside the accounting (refined frames only).
    main_counters = ("drop_stale", "drop_send_full", "drop_engine_timeout") if screen else ()
    stages = [
        StageSpec("capture", "capture", counters=("read", *SOURCE_COUNTERS)),
        StageSpec("preprocess", "preprocess",
                  counters=("refine_sent", "refine_gone",
                            *(("relayed", "remote_late", "refused", "workers_joined", "workers_lost")
                              if remote else ()))),
        *([StageSpec("screen", "infer", bundle="screen", counters=ENGINE_COUNTERS)] if screen else []),
        StageSpec("infer", "infer", counters=(*main_counters, *ENGINE_COUNTERS), replicas=infer_workers),
        StageSpec("postprocess", "postprocess",
                  counters=("scored", "refined", "refine_requests_lost", "best_image_missed",
                            "operator_start", "operator_stop", "operator_rejected", "refused")),
    ]
    return Graph(stages=tuple(stages), links=tuple(links),
                 ring=Ring(writer="capture", first_reader="preprocess", last_reader="postprocess"))


@dataclass(frozen=True)
class Wiring:
    """Where everything of one run lives; built by the supervisor from the graph, handed to every stage."""

    graph: Graph
    control: str  # supervisor ROUTER; each stage instance is a DEALER named after itself
    endpoints: dict[str, str] = field(default_factory=dict)  # link name -> endpoint
    ring: str = ""  # shared-memory name of the frame ring
    out: str = ""  # run folder
    run_id: str = ""
    supervisor_pid: int = 0
    socket_dir: str = ""

    @classmethod
    def for_run(cls, graph: Graph, socket_dir: str, **run: object) -> Wiring:
        endpoints = {link.name: link.endpoint or f"ipc://{socket_dir}/{link.name}" for link in graph.links}
        return cls(graph, f"ipc://{socket_dir}/control", endpoints, socket_dir=socket_dir, **run)


ROLES: dict[str, str] = {
    "capture": "pipeline.capture:CaptureStage",
    "preprocess": "pipeline.preprocess:PreprocessStage",
    "infer": "pipeline.infer:InferStage",
    "postprocess": "pipeline.postprocess:PostprocessStage",
}
"""Stage role -> the class that plays it, imported by the stage's own process only."""
