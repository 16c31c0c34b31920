"""Tuning: what to change next. `sufficiency` estimates whether more data would help (learning
curves on nested fractions of the training split, fitted by `curve`); hyperparameter search
comes here too. This floor sits above `train` and may import everything below it.
"""
