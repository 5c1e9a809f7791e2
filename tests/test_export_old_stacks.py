"""An `export-hf --weights bin` directory in LLM-CXR's own stack: a fresh venv with transformers 4.28.1 and
tokenizers 0.13.3 from PyPI (no safetensors package) loads it with AutoTokenizer / AutoModelForCausalLM,
encodes as we do, gives our logits at 1e-4 and greedy-decodes our tokens. Slow: it pip-installs."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from hf_helpers import CORPUS, make_hf_model, make_tokenizer_dir

from llmcxr_jax import checkpoint, cli, sharding, vocab
from llmcxr_jax.data import prompts
from llmcxr_jax.infer import generate as gen
from llmcxr_jax.infer import sampling

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.torch]
K = 38
MAX_NEW_TOKENS = 24
# LLM-CXR's environment.yaml pins; numpy 2 postdates transformers 4.28, so the venv keeps numpy 1.
OLD_STACK = ("transformers==4.28.1", "tokenizers==0.13.3", "numpy<2")

OLD_SIDE = textwrap.dedent('''
    import json, sys
    import numpy as np, tokenizers, torch, transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, job, out = sys.argv[1:4]
    job = json.load(open(job))
    try:
        import safetensors  # noqa: F401
        has_safetensors = True
    except ImportError:
        has_safetensors = False
    raw = tokenizers.Tokenizer.from_file(directory + "/tokenizer.json")
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    result = {"versions": [transformers.__version__, tokenizers.__version__, np.__version__],
              "safetensors": has_safetensors, "tokenizer_class": type(tok).__name__, "len": len(tok),
              "raw": [raw.encode(t).ids for t in job["texts"]],
              "auto": [tok(t, add_special_tokens=False).input_ids for t in job["texts"]],
              "dolly": tok.convert_tokens_to_ids(job["dolly"]), "pad": tok.pad_token_id, "eos": tok.eos_token_id,
              "greedy": []}
    with torch.no_grad():
        for n, ids in enumerate(job["prompts"]):
            ids = torch.tensor([ids])
            np.save(f"{out}/logits{n}.npy", model(input_ids=ids).logits[0].numpy())
            new = model.generate(ids, do_sample=False, max_new_tokens=job["max_new_tokens"])[0, ids.shape[1]:]
            result["greedy"].append(new.tolist())
    json.dump(result, open(out + "/result.json", "w"))
''')


def _run(argv, **kw):
    done = subprocess.run(argv, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{argv[:4]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def old_python(tmp_path_factory):
    """A fresh venv holding LLM-CXR's transformers / tokenizers and this torch (pip's cache makes it ~30 s)."""
    venv = str(tmp_path_factory.mktemp("old_stack") / "venv")
    _run([sys.executable, "-m", "venv", venv])
    python = os.path.join(venv, "bin", "python")
    _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *OLD_STACK,
          f"torch=={torch.__version__}"], timeout=900)
    return python


@pytest.fixture(scope="module")
def bin_export(tmp_path_factory):
    """A tiny dolly-like HF directory -> import-hf (K image rows) -> export-hf --weights bin."""
    root = tmp_path_factory.mktemp("export")
    tok = make_tokenizer_dir(str(root / "tok"))
    make_hf_model(str(root / "hf"), 300, tokenizer_dir=tok, seed=7)
    ckpt, out = str(root / "ckpt"), str(root / "bin")
    assert cli.main(["import-hf", "--hf", str(root / "hf"), "--out", ckpt, "--image-codes", str(K),
                     "--dtype", "float32"]) == 0
    assert cli.main(["export-hf", "--ckpt", ckpt, "--out", out, "--weights", "bin"]) == 0
    assert not [n for n in os.listdir(out) if "safetensors" in n]
    return checkpoint.load_lm(ckpt, sharding.make_mesh("1,-1,1"), dtype="float32"), out


def _prompts(lm):
    """Dolly-keyed prompts, two with image tokens inside, short enough for the tiny model's 128 positions
    (transformers 4.28 fails past max_position_embeddings; the full Dolly prompt is in the tokenizer texts)."""
    rng = np.random.default_rng(0)
    encode = lambda text: lm.tokenizer.encode(text).ids  # noqa: E731
    image = lambda n: lm.layout.image_token(rng.integers(0, K, n)).tolist()  # noqa: E731
    instruction, response = f"{vocab.INSTRUCTION_KEY}\n", f"\n\n{vocab.RESPONSE_KEY}"
    out = [encode(instruction + "Write the report.\n") + image(16) + encode(response),
           encode(instruction + "Is there a pleural effusion?" + response),
           encode("No pleural effusion.") + image(8)]
    assert all(len(ids) + MAX_NEW_TOKENS <= 128 for ids in out), [len(ids) for ids in out]
    return out


def _ours(lm, ids):
    out = gen.generate(lm.model, np.asarray([ids]), np.ones((1, len(ids)), bool), layout=lm.layout,
                       special=lm.special, mode="unconstrained", rng=jax.random.key(0),
                       sampling=sampling.SamplingConfig.greedy_decoding(MAX_NEW_TOKENS))
    return np.asarray(out.tokens)[0, :int(np.asarray(out.lengths)[0])].tolist()


def test_llmcxr_stack_reads_a_bin_export_and_decodes_our_tokens(old_python, bin_export, tmp_path):
    lm, out = bin_export
    texts = list(CORPUS) + list(vocab.DOLLY_SPECIAL_TOKENS) + ["<image>", "<|endoftext|>", "ünïcödé ✓  x\n\n",
                                                               prompts.generation_prompt("Describe.", "<image>")]
    job = {"texts": texts, "dolly": list(vocab.DOLLY_SPECIAL_TOKENS), "prompts": _prompts(lm),
           "max_new_tokens": MAX_NEW_TOKENS}
    json.dump(job, open(tmp_path / "job.json", "w"))
    (tmp_path / "old_side.py").write_text(OLD_SIDE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    _run([old_python, str(tmp_path / "old_side.py"), out, str(tmp_path / "job.json"), str(tmp_path)],
         env=env, cwd=str(tmp_path), timeout=600)
    r = json.load(open(tmp_path / "result.json"))
    assert r["versions"][:2] == ["4.28.1", "0.13.3"] and r["versions"][2].startswith("1.")
    assert r["safetensors"] is False  # so the weights came from pytorch_model.bin
    assert r["tokenizer_class"] == "PreTrainedTokenizerFast" and r["len"] == lm.layout.text_size
    want = [lm.tokenizer.encode(t).ids for t in texts]
    assert r["raw"] == want and r["auto"] == want
    s = lm.special
    assert r["dolly"] == [s.end_key_id, s.instruction_key_id, s.response_key_id]
    assert r["pad"] == s.pad_id and r["eos"] == s.eos_id
    for n, ids in enumerate(job["prompts"]):
        logits = np.asarray(lm.model(np.asarray([ids])))[0, :, :lm.layout.size]
        np.testing.assert_allclose(logits, np.load(tmp_path / f"logits{n}.npy"), atol=1e-4, rtol=0)
        ours = _ours(lm, ids)
        assert r["greedy"][n] == ours, n
    assert all(r["greedy"])  # each prompt was continued: the comparison above saw tokens
