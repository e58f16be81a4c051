"""The application built on the library: the `jqlora` command and its subcommands, and the
fine-tuning run (``finetune``) with its one run configuration (``FinetuneConfig``).

The library (every other package under ``jqlora``) never imports this package;
``tests/test_layers.py`` checks it.
"""
