"""From input rows to training pairs: sources (files, folders, Hugging Face datasets), formats
(PKU-SafeRLHF, HH-RLHF, generic, implicit prompt), tokenization with an exact prompt/response
boundary, training-time pair handling and batches, and a cache as a PyTorch dataset."""
