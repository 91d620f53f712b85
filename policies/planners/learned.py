"""The learned planner ``splitwise-rl``: an ONNX policy (:mod:`policies.learned` is its contract)
run with onnxruntime, one ``session.run`` per decision.

The device never trusts the file: every problem — a file that is missing, unreadable or not ONNX,
metadata for another model or featurizer, other input/output names, a run error, outputs of the
wrong shape or range, a plan that breaks a rule (:func:`policies.learned.plan_problems`) — makes this
decision fall back to ``splitwise-dp``, whose plan then carries the reason in its name
(``"splitwise-dp (splitwise-rl fallback: <reason>)"``), so the reply tells the app. A reason is
logged once per planner.

Which file: :attr:`PlanningContext.policy` (``[planning] policy``), or by default the shipped policy
for this model and edge machine (:func:`shipped_policy`, from ``policies/trained/``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from policies.cost import CostModel, Observation, plan_memory
from policies.featurizer import N_FEATURES, features
from policies.learned import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    PolicyMetadata,
    cut_options,
    memory_inputs,
    plan_from_outputs,
    plan_problems,
)
from policies.plan import Plan, Side
from policies.planners.context import PlanningContext
from policies.planners.dp import SplitwiseDpPlanner
from policies.segments import ModelDims
from splitwise_core.config import readable_file_problems
from splitwise_core.profile import Profile

__all__ = [
    "NO_SHIPPED_POLICY",
    "TRAINED_DIR",
    "LearnedPlanner",
    "PolicyFileError",
    "policy_file_problems",
    "preload_policies",
    "shipped_policies",
    "shipped_policy",
]

log = logging.getLogger(__name__)

TRAINED_DIR = Path(__file__).resolve().parents[1] / "trained"
"""The shipped policies (package data): ``<edge profile machine>.<model>.onnx``."""

NO_SHIPPED_POLICY = "no shipped policy for this model and device profile (set [planning] policy)"

_MAX_PLAN_NAME = 256  # what a plan's name may hold (policies.plan.Plan.from_dict)
_FALLBACK_PREFIX = f"{SplitwiseDpPlanner.name} (splitwise-rl fallback: "


class PolicyFileError(Exception):
    """A policy file this device cannot use; the message says why (one line)."""


@dataclass(frozen=True)
class _Policy:
    """A policy file loaded and checked against the contract and the model."""

    session: Any  # onnxruntime.InferenceSession (untyped library)
    metadata: PolicyMetadata


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _read_metadata(session: Any) -> PolicyMetadata:
    try:
        return PolicyMetadata.from_strings(dict(session.get_modelmeta().custom_metadata_map))
    except ValueError as err:
        raise PolicyFileError(str(err)) from None


def _open_session(path: Path) -> Any:
    """An onnxruntime session for `path` on the CPU, one thread: the device's compute threads belong
    to the model, and a policy this small gains nothing from more."""
    try:
        problems = readable_file_problems(path)
    except OSError as err:  # a path the OS refuses to look at, e.g. a name too long
        raise PolicyFileError(f"cannot read {path}: {err.strerror or err}") from None
    if problems:
        raise PolicyFileError(problems[0])
    # Imported here: onnxruntime is only needed when a learned policy is used, not to load the registry.
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: a bad file is reported by our own message
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    # onnxruntime raises its own exception classes (InvalidProtobuf, Fail, ...) with no common base
    # besides Exception; any of them means the same here: not a usable ONNX file.
    except Exception as err:
        raise PolicyFileError(f"{path} is not a readable ONNX model: {_first_line(err)}") from None


_SESSIONS: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
_SESSIONS_LOCK = threading.Lock()
_MAX_SESSIONS = 8


def _cached_session(path: Path) -> Any:
    """The session for `path`, opened once per file version (path, modification time, size).

    Opening one takes most of a second (onnxruntime optimises the graph), and a planner is rebuilt
    whenever a worker publishes a new profile; onnxruntime sessions may run from several threads."""
    try:
        stat = path.stat()
    except OSError:
        return _open_session(path)  # reports why, in its words
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _SESSIONS_LOCK:
        if key in _SESSIONS:
            _SESSIONS.move_to_end(key)
            return _SESSIONS[key]
    session = _open_session(path)
    with _SESSIONS_LOCK:
        _SESSIONS[key] = session
        while len(_SESSIONS) > _MAX_SESSIONS:
            _SESSIONS.popitem(last=False)
    return session


def _load_policy(path: Path, dims: ModelDims) -> _Policy:
    """`path` loaded and checked (metadata, model shape, featurizer version, input and output names);
    PolicyFileError saying why not."""
    session = _cached_session(path)
    metadata = _read_metadata(session)
    mismatch = metadata.mismatch(dims)
    if mismatch is not None:
        raise PolicyFileError(mismatch)
    inputs = tuple(node.name for node in session.get_inputs())
    outputs = tuple(node.name for node in session.get_outputs())
    # onnxruntime feeds and fetches by name, so the order does not matter, the set does.
    if sorted(inputs) != sorted(INPUT_NAMES):
        raise PolicyFileError(f"graph inputs are {list(inputs)}, expected {list(INPUT_NAMES)}")
    if sorted(outputs) != sorted(OUTPUT_NAMES):
        raise PolicyFileError(f"graph outputs are {list(outputs)}, expected {list(OUTPUT_NAMES)}")
    return _Policy(session, metadata)


def policy_file_problems(path: Path, dims: ModelDims) -> list[str]:
    """Why the policy file at `path` cannot plan for a model of shape `dims` (empty when it can); the
    same checks the planner makes when it loads it (``check-config`` uses this)."""
    try:
        _load_policy(path, dims)
    except PolicyFileError as err:
        return [str(err)]
    return []


def shipped_policies(dims: ModelDims) -> list[tuple[Path, PolicyMetadata]]:
    """The shipped policies (:data:`TRAINED_DIR`, by file name) trained for this model shape and this
    featurizer, with their metadata. Files that do not load are skipped (and logged)."""
    found = []
    for path in sorted(TRAINED_DIR.glob("*.onnx")):
        try:
            metadata = _read_metadata(_cached_session(path))
        except PolicyFileError as err:
            log.warning("skipping shipped policy %s: %s", path.name, err)
            continue
        if metadata.mismatch(dims) is None:
            found.append((path, metadata))
    return found


def preload_policies(dims: ModelDims, configured: Path | None) -> None:
    """Opens the policy file `configured` (or, without one, the shipped policies for this model
    shape) into the session cache, so that the first request does not pay the session's start-up
    (most of a second) and the process's memory reaches its working size at start. A file that does
    not load is only logged here: the planner falls back, and says why, when it is asked to plan."""
    if configured is None:
        shipped_policies(dims)
        return
    try:
        _load_policy(configured, dims)
    except PolicyFileError as err:
        log.warning("splitwise-rl will fall back to splitwise-dp: %s", err)


def shipped_policy(dims: ModelDims, edge_profile: Profile) -> Path | None:
    """The first shipped policy for this model shape, this featurizer and this edge machine (the
    profile's ``machine``); None when there is none."""
    return next((path for path, meta in shipped_policies(dims) if meta.edge_machine == edge_profile.machine), None)


def _fallback_name(reason: str) -> str:
    name = f"{_FALLBACK_PREFIX}{reason})"
    if len(name) <= _MAX_PLAN_NAME:
        return name
    room = _MAX_PLAN_NAME - len(_FALLBACK_PREFIX) - len("…)")
    return f"{_FALLBACK_PREFIX}{reason[:room]}…)"


def _array(outputs: dict[str, Any], name: str, shape: tuple[int, ...], kind: str) -> npt.NDArray[Any]:
    """Output `name`, checked to be a numpy array of `shape` whose dtype kind is in `kind`."""
    value = outputs[name]
    if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype.kind not in kind:
        got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise PolicyFileError(f"output {name!r} is {got}, expected shape {shape}")
    return value


class LearnedPlanner:
    """Plans with a learned ONNX policy; falls back to ``splitwise-dp`` (module docstring).

    Built once per context and kept across decisions: the session is created once, and the planner
    keeps the policy's history window (the graph's ``history_out``, passed back as the next
    ``history``).
    """

    name = "splitwise-rl"

    def __init__(self, ctx: PlanningContext) -> None:
        self.ctx = ctx
        self._fallback = SplitwiseDpPlanner(ctx)
        self._warned: set[str] = set()
        # One decision at a time: each needs the history the previous one left.
        self._lock = threading.Lock()
        self._policy: _Policy | None = None
        self.path: Path | None = ctx.policy or shipped_policy(ctx.dims, ctx.edge_profile)
        self.problem: str | None = None
        """Why this planner falls back (the last decision's reason), None while the policy plans."""
        history = 0
        if self.path is None:
            self.problem = NO_SHIPPED_POLICY
        else:
            try:
                self._policy = _load_policy(self.path, ctx.dims)
                history = self._policy.metadata.history
            except PolicyFileError as err:
                self.problem = str(err)
        self._history: npt.NDArray[np.float32] = np.zeros((1, history, N_FEATURES), dtype=np.float32)

    @property
    def history(self) -> npt.NDArray[np.float32]:
        """The ``history`` the next decision passes to the policy (shape ``[1, K, N_FEATURES]``)."""
        return self._history

    def plan(self, observation: Observation) -> Plan:
        with self._lock:
            if self._policy is None:
                assert self.problem is not None
                return self._fall_back(observation, self.problem)
            model = self.ctx.cost_model(observation)
            try:
                plan = self._run(self._policy, observation, model)
            except (PolicyFileError, ValueError) as err:  # PlanError is a ValueError
                return self._fall_back(observation, str(err))
            problems = plan_problems(plan, model, self.ctx.min_edge_layers, plan_memory(plan, model))
            if problems:
                return self._fall_back(observation, "; ".join(problems))
            self.problem = None
            return plan

    def _run(self, policy: _Policy, observation: Observation, model: CostModel) -> Plan:
        """The policy's plan for `observation` (one ``session.run``); keeps its ``history_out``."""
        dims = self.ctx.dims
        inputs = {
            "features": features(observation)[np.newaxis, :],
            "history": self._history,
            "memory": memory_inputs(model)[np.newaxis, :],
            "min_edge_layers": np.array([self.ctx.min_edge_layers], dtype=np.int64),
        }
        try:
            values = policy.session.run(list(OUTPUT_NAMES), inputs)
        # onnxruntime's run errors have no common base besides Exception (see _open_session).
        except Exception as err:
            raise PolicyFileError(f"the policy failed to run: {_first_line(err)}") from None
        outputs = dict(zip(OUTPUT_NAMES, values, strict=True))
        history_out = _array(outputs, "history_out", self._history.shape, "f")
        if not np.isfinite(history_out).all():
            raise PolicyFileError("output 'history_out' is not finite")
        # The history follows the observations whatever becomes of this plan.
        self._history = history_out.astype(np.float32)
        cut = int(_array(outputs, "cut", (1,), "iu")[0])
        head_cloud = _array(outputs, "head_cloud", (1, dims.n_layer, dims.n_head), "iu")[0]
        ffn_mode = _array(outputs, "ffn_mode", (1, dims.n_layer), "iu")[0]
        lm_head_cloud = int(_array(outputs, "lm_head_cloud", (1,), "iu")[0])
        if cut not in cut_options(dims.n_layer):
            raise PolicyFileError(f"output 'cut' = {cut} is not one of {list(cut_options(dims.n_layer))}")
        plan = plan_from_outputs(head_cloud, ffn_mode, lm_head_cloud, dims, name=self.name)
        if any(not lp.all_on(Side.EDGE, plan.n_head) for lp in plan.layers[:cut]):
            raise PolicyFileError(f"the plan does not keep the {cut} layers below its cut on the edge")
        return plan

    def _fall_back(self, observation: Observation, reason: str) -> Plan:
        self.problem = reason
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("%s falls back to %s: %s", self.name, self._fallback.name, reason)
        plan = self._fallback.plan(observation)
        return dataclasses.replace(plan, name=_fallback_name(reason))
