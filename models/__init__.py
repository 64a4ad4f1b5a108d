"""Pure-torch networks: HRNet segmenter, SE blocks, discriminator, baselines. No I/O."""
