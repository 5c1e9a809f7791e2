"""LLM-CXR's own data recipe as options beside ours (data.directions, data.mix, data.stage2_list, data.eval_list):
one direction per image by index parity, the MIMIC-vs-Dolly 0.8 / 0.2 interleave as task weights, and its shipped
selection lists, read through safe_pickle so that nothing in them runs.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from llmcxr_jax import safe_pickle, user_files
from llmcxr_jax.errors import MissingInputError, UsageError

DIRECTIONS = ("both", "parity")  # data.directions: every image both ways (ours), or one way each (LLM-CXR)
MIXES = ("fixed", "original")  # data.mix: data.mixture's weights (ours), or LLM-CXR's interleave
MIMIC_SHARE = 0.8  # interleave_datasets([mimic, dolly], [0.8, 0.2], stopping_strategy="all_exhausted")
IMAGE_IN, IMAGE_OUT = "cxr_to_report", "report_to_cxr"  # its io_type "input" / "output"
ROOT_TOKEN = "{data.root}"  # in a list path: the corpus root, where LLM-CXR keeps its selection pickle
# config key -> (LLM-CXR's file, where its repository keeps it, what "" means here)
LISTS = {
    "stage2_list": ("mimic-cxr-2.0.0-selected-pa-ap-earlist-study.pickle", "data/mimic-cxr-jpg/",
                    "rebuild the earliest PA/AP selection from the metadata"),
    "eval_list": ("eval_dicom_ids.pickle", "data/", "evaluate on that selection over validate + test"),
}
# The functions pandas (2.x and 3.x) pickles its values with (Series rows, Timestamps, NaT, Timedeltas, slices of
# block placements): a dict keyed by dicom id may hold them as values, which are never used here. Each becomes an
# inert call that records its arguments; pandas is never imported. Any other function a file calls is refused.
PANDAS_REBUILDERS = (
    "pandas.core.indexes.base._new_Index", "pandas._libs.internals._unpickle_block",
    "pandas._libs.arrays.__pyx_unpickle_NDArrayBacked", "pandas._libs.tslibs.timestamps._unpickle_timestamp",
    "pandas._libs.tslibs.timedeltas._timedelta_unpickle", "pandas._libs.tslibs.nattype.__nat_unpickle",
    "pandas._libs.tslibs.nattype._nat_unpickle", "builtins.slice")


def _inert_call(name: str) -> safe_pickle.Allowed:
    module, _, function = name.rpartition(".")
    record = safe_pickle.StandInType(function, (safe_pickle.StandIn,), {
        "pickle_module": module, "pickle_name": function, "__module__": __name__, "__qualname__": function})
    return safe_pickle.Allowed(lambda *args, **kwargs: record.__new__(record, *args, **kwargs), name)


_LIST_GLOBALS = {**safe_pickle.DATA_GLOBALS, **safe_pickle.numpy_globals(),
                 **{tuple(n.rsplit(".", 1)): _inert_call(n) for n in PANDAS_REBUILDERS}}


def parity_directions(listed_ids: Iterable[str], bad_codes: Iterable[str] = ()) -> dict[str, str]:
    """dicom id -> the one task LLM-CXR trains its image on (MimicCxrVqDataset): the split's ids are numbered
    in sorted order, leaving out only those whose codes failed its check (wrong length, code outside the
    codebook); an even number gives CXR->report, an odd one report->CXR. The numbering runs over every
    listed id, used or not (no report, no codes, outside the stage-2 selection), as its loop does."""
    ids = sorted(set(listed_ids) - set(bad_codes))
    return {d: IMAGE_IN if i % 2 == 0 else IMAGE_OUT for i, d in enumerate(ids)}


def interleave_weights(sizes: Mapping[str, int], text_task: str = "text") -> dict[str, float]:
    """Task weights of LLM-CXR's interleave of [concatenated MIMIC tasks, Dolly] at [0.8, 0.2]: a MIMIC draw
    takes the next example of the concatenation, so its 0.8 splits over the MIMIC tasks in proportion to
    their pool sizes; text keeps 0.2. Only the tasks in `sizes` take part; without text MIMIC takes all."""
    mimic = {t: int(n) for t, n in sizes.items() if t != text_task}
    total = sum(mimic.values())
    share = MIMIC_SHARE if text_task in sizes and total else (1.0 if total else 0.0)
    out = {t: share * n / total if total else 0.0 for t, n in mimic.items()}
    if text_task in sizes:
        out[text_task] = 1.0 - share
    return out


def list_path(value: str, root: str) -> str:
    """A data.stage2_list / data.eval_list value with {data.root} filled in."""
    return value.replace(ROOT_TOKEN, root) if value else ""


def read_id_list(path: str, key: str, flag: str | None = None) -> frozenset[str]:
    """LLM-CXR's shipped selection (a pickled dict keyed by dicom id, whose values are ignored) or evaluation
    list (a pickled list of ids) -> the ids; a .txt file holds one id per line. The pickle goes through
    safe_pickle with stand-ins: classes of absent modules (pandas) and PANDAS_REBUILDERS become inert objects,
    code-running globals are refused before anything is called. key names the config key in errors, or
    `flag` the command-line flag that gave the path."""
    name, where, fallback = LISTS[key]
    unset = f"leave out {flag}" if flag else f"set data.{key}=\"\""
    fix = f"give LLM-CXR's {name} (its repository's {where}) or {unset} to {fallback}"
    label = flag or f"data.{key}"
    if not os.path.isfile(path):
        raise MissingInputError(f"{label} {path} does not exist; {fix}")
    if path.endswith(".txt"):
        value: object = [line.strip() for line in user_files.text_lines(path, label) if line.strip()]
    else:
        try:
            with open(path, "rb") as f:
                value = safe_pickle.load(f, allowed=_LIST_GLOBALS, stand_ins=True)
        except safe_pickle.RefusedGlobal as e:
            raise UsageError(f"{label} {path} was refused, nothing in it ran ({e}); {fix}, or its ids as a "
                             ".txt file, one per line") from None
        except safe_pickle.MALFORMED as e:
            raise UsageError(f"{label} {path} is not a readable pickle ({safe_pickle.describe(e)}); {fix}") from None
    if not isinstance(value, (dict, list, tuple, set, frozenset)):
        shown = getattr(type(value), "pickle_global", type(value).__name__)
        raise UsageError(f"{label} {path} is a pickled {shown}, not a list or dict of dicom id strings; {fix}")
    ids = list(value)
    bad = [i for i in ids if not (isinstance(i, str) and i.strip())]
    if bad:
        raise UsageError(f"{label} {path} holds {safe_pickle.one_line(repr(bad[0]), 60)} "
                         f"({type(bad[0]).__name__}), not a dicom id string; {fix}")
    if not ids:
        raise UsageError(f"{label} {path} holds no dicom ids; {fix}")
    return frozenset(str(i).strip() for i in ids)
