"""The paper's application of ddfast (Yan et al., DeepDefense, NeurIPS 2018): the networks of
its Table 3 (:mod:`.models`), MNIST / Fashion-MNIST / CIFAR-10 readers and preprocessing
(:mod:`.data`), training with the four methods it compares (:mod:`.train`), the MNIST
reproduction of Table 1 and its figures (:mod:`.reproduce`, :mod:`.plots`) and the ``ddfast``
command (:mod:`.cli`). It builds on the core library (``ddfast.deepfool``,
``ddfast.deepdefense_loss``, ``ddfast.metrics``), which imports nothing from here; tqdm and
matplotlib are needed only here (:mod:`.extras`; ``pip install "ddfast[paper]"``).
"""
