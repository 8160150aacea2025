"""Keras callbacks the training tests use to interrupt a `fit` and see which epochs ran."""

import keras


class Interrupt(Exception):
    """Raised by `StopAfter` in place of a real Ctrl-C or kill."""


class StopAfter(keras.callbacks.Callback):
    """Raises `Interrupt` at the end of epoch `epoch`, after the callbacks before it (the backup)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupt()


class EpochRecorder(keras.callbacks.Callback):
    """Records the index of every epoch that begins."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)
