"""Language pipeline: a small decoder-only transformer fine-tuned with SFT and iw-SFT on curated
samples."""
