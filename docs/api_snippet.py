"""The README's Python API example, runnable after `llmcxr demo` (tests/test_api.py runs it on the
quick demo's model, with runs/demo_full replaced by that workdir)."""
import glob

from PIL import Image

from llmcxr_jax import Generator

g = Generator.from_checkpoints("runs/demo_full/stage2/checkpoints", "runs/demo_full/vqgan/vqgan")
cxr = sorted(glob.glob("runs/demo_full/corpus/files/**/*.jpg", recursive=True))[0]  # any JPEG/PNG, 8 or 16 bit

report = g.report(cxr)  # str; sampled as LLM-CXR sampled (temperature 1, top_p 0.92), seed 0
image = g.image("Small left pleural effusion.", seed=1)  # uint8 array, the VQ-GAN's size
answer = g.answer(cxr, "Is there a pleural effusion?", temperature=0.5)  # str
Image.fromarray(image).save("drawn.png")
print(report, answer, image.shape, sep="\n")
