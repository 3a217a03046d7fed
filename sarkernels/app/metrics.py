"""Quality of generated digits: a classifier trained on real training digits reads the
class we asked for (class-conditional accuracy), and a Frechet distance between generated
and held-out real images in the classifier's hidden-layer feature space. The same distance
between two real sets is the floor."""
import numpy as np
import torch.nn.functional as F

from .fid import frechet_to, statistics


def _pixels(images):
    """Images in [0, 1] ``[B, 1, H, W]`` -> 8x8 intensity rows (0..16) the judge reads."""
    x = images.float()
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return (x * 16).flatten(1).numpy()


class DigitsJudge:
    def __init__(self, train_images, train_labels, seed=0):
        from sklearn.neural_network import MLPClassifier

        self.clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=seed)
        self.clf.fit(_pixels(train_images), train_labels.numpy())

    def accuracy(self, images, labels):
        return float((self.clf.predict(_pixels(images)) == labels.numpy()).mean())

    def features(self, images):
        hidden = _pixels(images) @ self.clf.coefs_[0] + self.clf.intercepts_[0]
        return np.maximum(hidden, 0)

    def logits(self, images):
        """The classifier's class logits (the Inception Score's ``p(y|x)`` before softmax)."""
        return self.features(images) @ self.clf.coefs_[1] + self.clf.intercepts_[1]

    def frechet(self, images_a, images_b):
        return frechet_to(self.features(images_a), *statistics(self.features(images_b)))
