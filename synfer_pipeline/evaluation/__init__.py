"""Evaluation: generation quality (FER acc, AU acc), downstream FER training on real / synthetic / both, export."""
