"""Evaluation: the CheXpert-style labeler, report metrics (scikit-learn, pycocoevalcap, METEOR), image
metrics (FID with scipy, PSNR, SSIM) on the features of our CXR classifier, the torchxrayvision
DenseNet or the FID Inception-v3, the torchxrayvision classifier's scores, bootstrap intervals, VQA
scores, and `llmcxr evaluate`'s tables and grids (evaluate.py, protocol.py for `--protocol paper`,
report_card.py, board.py for its TensorBoard logs)."""
