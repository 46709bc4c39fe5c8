"""Layers with explicit forward/backward passes (course API).

Every layer is written once against the array API standard and binds to the
backend that is current when it is constructed.
"""
from xpnn.layers.base import BaseLayer, TrainableLayer
from xpnn.layers.fully_connected import FullyConnected
from xpnn.layers.activations import ReLU, SoftMax, Sigmoid, TanH
from xpnn.layers.flatten import Flatten
from xpnn.layers.dropout import Dropout
from xpnn.layers.batch_normalization import BatchNormalization
from xpnn.layers.conv import Conv
from xpnn.layers.pooling import Pooling
from xpnn.layers.rnn import RNN
from xpnn.layers.lstm import LSTM
from xpnn.layers.sequences import ImageRows, LastStep
