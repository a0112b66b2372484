"""The METIS paper: what cards and trainers cite."""

TITLE = "Post-Hoc Merging is Not Enough: Many-Shot Model Merging with Loss-Gap Balancing"
ARXIV_ID = "2606.16501"
CITATION = f"""@inproceedings{{im2026metis,
  title     = {{{TITLE}}},
  author    = {{Im, K. and Kim, M. and Eom, C. and Kwon, M.}},
  booktitle = {{Proceedings of the 43rd International Conference on Machine Learning (ICML)}},
  year      = {{2026}},
  eprint    = {{{ARXIV_ID}}},
  archivePrefix = {{arXiv}}
}}"""
