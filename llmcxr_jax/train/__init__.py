"""Training: the LM's sharded train step and loop (lm.py, state.py, optim.py, lm_data.py, the chunked
loss, profiling), the VQ-GAN's (vqgan.py, vqgan_loss.py), metrics and TensorBoard logs, preemption,
and compile-check with its chip table (topologies.py)."""
