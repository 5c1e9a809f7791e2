"""Real data only, in the order it flows: a MIMIC-CXR-JPG root read into records (mimic_cxr.py),
images decoded (images.py, image_stream.py), encoded into VQ-GAN codes (encode.py, codes.py),
prompts and instruction lists read and tokenized (prompts.py, instructions.py, text_tokenizer.py),
and packed into per-host LM batches (lm_batches.py, packing.py, host_shards.py; LLM-CXR's own
recipe in original_recipe.py); tfds_mimic_cxr.py is the same root as a TFDS builder."""
