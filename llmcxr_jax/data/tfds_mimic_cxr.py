"""A tensorflow-datasets builder for MIMIC-CXR-JPG (manual download) that writes ArrayRecord
files of data/mimic_cxr.py's stage 1 / stage 2 / evaluation selections, for
`tfds.data_source` and grain. Needs no TensorFlow; the synthetic corpus builds the same way.
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

from etils import epath
from PIL import Image

from llmcxr_jax.data import mimic_cxr as mc

try:
    import tensorflow_datasets as tfds
except ModuleNotFoundError as e:  # an optional extra: only this builder needs it
    if e.name != "tensorflow_datasets":
        raise
    raise ModuleNotFoundError("llmcxr_jax.data.tfds_mimic_cxr needs tensorflow-datasets; install it with "
                              "pip install 'llmcxr-jax[tfds]'", name=e.name) from None

# selection -> (the splits it writes, description)
SELECTIONS = {
    "stage1": (("train",), "train images whose report has findings or impression; report = "
                           "findings + impression (LLM-CXR stage 1)"),
    "stage2": (("train",), "train PA/AP images of each subject's earliest PA/AP study with an "
                           "impression; report = impression (LLM-CXR stage 2)"),
    "eval": (mc.EVAL_SPLITS, "validate + test PA/AP images of each subject's earliest PA/AP study "
                             "with an impression; report = impression (LLM-CXR evaluation)"),
}


@dataclasses.dataclass(eq=False)
class MimicCxrConfig(tfds.core.BuilderConfig):
    selection: str = "stage1"      # a key of SELECTIONS
    embed_images: bool = False     # also store the JPEG (decoded to uint8 [H, W, 1] on read)
    check_images: bool = False     # decode every image while building; unreadable ones are left out


def _configs():
    out = []
    for selection, (_, text) in SELECTIONS.items():
        out.append(MimicCxrConfig(name=selection, selection=selection, description=f"{text}; image by path"))
        # Stored JPEGs must decode for every reader, so those builds check each image first.
        out.append(MimicCxrConfig(name=f"{selection}_jpeg", selection=selection, embed_images=True,
                                  check_images=True, description=f"{text}; JPEG bytes stored"))
    return out


class MimicCxrJpg(tfds.core.GeneratorBasedBuilder):
    """MIMIC-CXR-JPG 2.0.0 records with LLM-CXR's report text per stage.

    Text features come back from `tfds.data_source` as bytes. `image_path` is relative to the
    MIMIC-CXR-JPG root, so a built dataset stays valid when the corpus moves. With the `*_jpeg`
    configs, `decoders={"image": tfds.decode.SkipDecoding()}` returns the raw JPEG bytes.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: stage1, stage2, eval; by path or with JPEG bytes."}
    BUILDER_CONFIGS = _configs()
    DEFAULT_CONFIG_NAME = "stage1"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    MIMIC-CXR-JPG needs a credentialed PhysioNet account and a signed data use agreement.
    1. Download MIMIC-CXR-JPG 2.0.0 from https://physionet.org/content/mimic-cxr-jpg/2.0.0/
       (files/, mimic-cxr-2.0.0-split.csv.gz, mimic-cxr-2.0.0-metadata.csv.gz, ...-chexpert.csv.gz).
    2. Download mimic-cxr-reports.zip from https://physionet.org/content/mimic-cxr/2.0.0/ and
       unzip it so the reports lie at ROOT/reports/files/pXX/pSUBJECT/sSTUDY.txt (or pass
       reports_root=DIR with DIR/files/pXX/... to the builder).
    3. Use ROOT as manual_dir: tfds.download.DownloadConfig(manual_dir=ROOT).
    A synthetic corpus in the same layout (`llmcxr synth --out ROOT`) builds the same way.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 finds a packaged builder's file through the `importlib_resources` backport,
        # which it only installs on Python < 3.9 (ModuleNotFoundError here); no lookup is needed.
        return epath.Path(__file__)

    def __init__(self, *, file_format="array_record", reports_root=None, **kwargs):
        self._reports_root = reports_root
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        features = {name: text for name in ("dicom_id", "subject_id", "study_id", "split", "view",
                                            "study_date", "study_time", "image_path", "report",
                                            "findings", "impression")}
        if self.builder_config.embed_images:
            features["image"] = tfds.features.Image(shape=(None, None, 1), encoding_format="jpeg")
        return tfds.core.DatasetInfo(
            builder=self,
            description="MIMIC-CXR-JPG chest X-rays with report text as LLM-CXR uses it. "
                        + SELECTIONS[self.builder_config.selection][1],
            features=tfds.features.FeaturesDict(features),
            homepage="https://physionet.org/content/mimic-cxr-jpg/2.0.0/",
            citation="Johnson AEW, Pollard TJ, et al. MIMIC-CXR-JPG, a large publicly available "
                     "database of labeled chest radiographs. arXiv:1901.07042 (2019).",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        corpus = mc.load_corpus(dl_manager.manual_dir, reports_root=self._reports_root,
                                check_images=config.check_images)
        # What was left out and why, kept beside the data (metadata.json).
        self.info.metadata.update(corpus.summary())
        records = {"stage1": corpus.stage1, "stage2": corpus.stage2, "eval": corpus.evaluation}[config.selection]
        splits = SELECTIONS[config.selection][0]
        stage = 1 if config.selection == "stage1" else 2
        return {s: self._generate_examples([r for r in records if r.split == s], corpus.root, stage)
                for s in splits}

    def _generate_examples(self, records, root: Path, stage: int):
        for r in records:
            example = {
                "dicom_id": r.dicom_id, "subject_id": r.subject_id, "study_id": r.study_id,
                "split": r.split, "view": r.view, "study_date": r.study_date, "study_time": r.study_time,
                "image_path": Path(r.image_path).relative_to(root).as_posix(),
                "report": mc.stage_text(r, stage), "findings": r.findings or "",
                "impression": r.impression or "",
            }
            if self.builder_config.embed_images:
                example["image"] = _grey_jpeg(r.image_path)
            yield r.dicom_id, example


def _grey_jpeg(path: str) -> bytes:
    """The file's bytes when it is a grey JPEG (MIMIC's are); anything else re-encoded as grey
    JPEG, since the feature decodes to one channel."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:   # reads the header only
        if img.format == "JPEG" and img.mode == "L":
            return data
        out = io.BytesIO()
        img.convert("L").save(out, format="JPEG", quality=95)
        return out.getvalue()


def build(manual_dir, data_dir, config: str = "stage1", reports_root=None) -> MimicCxrJpg:
    """Builds one config of the dataset from a MIMIC-CXR-JPG root into data_dir and returns the
    builder; read it back with tfds.data_source(f"mimic_cxr_jpg/{config}", data_dir=data_dir)."""
    builder = MimicCxrJpg(config=config, data_dir=str(data_dir), reports_root=reports_root)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder
