"""Evaluation: the CheXpert-style labeler, report metrics (scikit-learn, pycocoevalcap), image
metrics (FID with scipy, PSNR, SSIM), the CXR classifier, VQA scores, and `llmcxr evaluate`'s
tables and grids (evaluate.py, report_card.py)."""
