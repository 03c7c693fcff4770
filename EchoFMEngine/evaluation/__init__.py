"""Evaluation of fine-tuned checkpoints: metric reports with bootstrap CIs (:mod:`.reports`),
figures (:mod:`.figures`), data specs (:mod:`.cases`), per-task evaluators (:mod:`.tasks`), the
``evaluate`` command (:mod:`.evaluate`) and the label-efficiency runner (:mod:`.label_efficiency`)."""
