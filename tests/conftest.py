"""Test setup: 8 simulated CPU devices. Runs before any test module (and hence jax) is imported."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Keep TensorFlow (tf.data in the input pipeline) off any GPU without paying for its import here; JAX is on
# the CPU anyway.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
