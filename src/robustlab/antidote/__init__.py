"""Antidote: post-fine-tuning safety re-alignment of Hugging Face LLMs by one-shot Wanda pruning
(Huang et al., ICML 2025).

The modules, in the order of the paper's pipeline:

- **data**: ``data`` (BeaverTails, the benign tasks, templates, the disjoint slices of one run).
- **models**: ``models`` (loading a base model and its adapters), ``sources`` (built-in offline models, GGUF),
  ``runtime`` (device, dtype, device map).
- **stages**: ``train`` (the plain SFT loop), ``defences/`` (alignment- and fine-tuning-stage defences and
  SafeLoRA / RESTA), ``methods`` (the one registry of every method and its stage; method strings).
- **realign** (the method): ``targets`` (which weights), ``calibration`` (the re-alignment set and its
  statistic), ``realign`` (scores, masks, apply, save), ``memory`` (peak memory of a call).
- **evaluate**: ``evaluate`` (generation, harmful score, task accuracy, likelihood measures), ``judges``
  (refusal phrases, beaver-dam), ``embedding_judge`` (the offline MiniLM judge).
- **experiments and reports**: ``pipeline`` + ``pipeline_report`` (align -> fine-tune -> realign ->
  evaluate), ``baselines_pipeline`` (the pipeline with a ``method:``), ``sweep`` + ``sweep_harness`` +
  ``sweep_report`` (the robustness sweep), ``tiny`` + ``demo`` + ``demo_report`` (the offline demo),
  ``stats``, ``reproduce``.
- **command line**: ``cli``, ``sweep_cli``, ``cli_common``.
"""
