# The JAX backend (keras_flax selects it when imported before keras).
Sys.setenv(KERAS_BACKEND = "jax")

keras <- reticulate::import("keras")
flax <- reticulate::import("flax")
jax <- reticulate::import("jax")
jnp <- reticulate::import("jax.numpy", convert = FALSE)
np <- reticulate::import("numpy", convert = FALSE)

# The CNN of the keras3 documentation's layer_flax_module_wrapper() example.
MyFlaxModule(flax$linen$Module) %py_class% {
  `__call__` <- flax$linen$compact(\(self, inputs) {
    inputs |>
      (flax$linen$Conv(features = 32L, kernel_size = tuple(3L, 3L)))() |>
      flax$linen$relu() |>
      flax$linen$avg_pool(
        window_shape = tuple(2L, 2L),
        strides = tuple(2L, 2L)
      ) |>
      # flatten all but the batch axis
      (\(x) x$reshape(tuple(x$shape[[1]], -1L)))() |>
      (flax$linen$Dense(features = 200L))() |>
      flax$linen$relu() |>
      (flax$linen$Dense(features = 10L))() |>
      flax$linen$softmax()
  })
}

random_images <- function(n, seed = 1) {
  set.seed(seed)
  list(
    x = array(runif(n * 28 * 28), c(n, 28, 28, 1)),
    y = sample(0:9, n, replace = TRUE)
  )
}

# Ground truth: flax's own apply on the same variables, as an R array.
module_apply <- function(module, variables, x, ...) {
  as_r_array(module$apply(variables, as_py_array(x), ...))
}

max_abs_difference <- function(a, b) max(abs(a - b))
