"""Everything that touches torch on the serving path: the model repository's specs
(``repository``), building and running a model (``runtime``), rewrites that make it faster with
the same answers (``optimize``) and key renamings for foreign weights (``keymaps``)."""
