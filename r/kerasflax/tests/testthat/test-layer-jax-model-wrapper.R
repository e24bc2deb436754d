# A linear model written as R functions of JAX arrays.
linear_call <- function(params, inputs) {
  jnp$add(jnp$matmul(inputs, params$w), params$b)
}
linear_init <- function(rng, inputs) {
  list(
    w = jax$random$normal(rng, tuple(inputs$shape[[2]], 2L)),
    b = jnp$zeros(2L)
  )
}

reticulate::py_run_string("
import jax, jax.numpy as jnp

def sgd_step(params, x, y, learning_rate):
    def loss(p):
        return jnp.mean((x @ p['w'] + p['b'] - y) ** 2)
    grads = jax.grad(loss)(params)
    return jax.tree_util.tree_map(
        lambda p, g: p - learning_rate * g, params, grads)
")

test_that("R functions as call_fn / init_fn: fit matches jax.grad + SGD", {
  set.seed(2)
  x <- matrix(rnorm(32 * 3), 32)
  y <- matrix(rnorm(32 * 2), 32)
  model <- keras$Sequential(list(keras$Input(shape = tuple(3L))))
  model |> layer_jax_model_wrapper(
    call_fn = linear_call, init_fn = linear_init, seed = 5
  )
  layer <- model$layers[[1]]
  initial <- as_r_variables(layer$params)
  expect_equal(dim(initial$w), c(3L, 2L))

  model$compile(optimizer = keras$optimizers$SGD(0.1), loss = "mse")
  model$fit(as_py_array(x), as_py_array(y),
    batch_size = 32L, epochs = 1L, shuffle = FALSE, verbose = 0L
  )

  expected <- reticulate::py$sgd_step(
    as_py_variables(initial, "params"), as_py_array(x), as_py_array(y), 0.1
  )
  trained <- as_r_variables(layer$params)
  expected <- as_r_variables(expected)
  expect_lt(max_abs_difference(trained$w, expected$w), 1e-5)
  expect_lt(max_abs_difference(trained$b, expected$b), 1e-5)
})

test_that("params as a named R list; tensor and missing objects", {
  params <- list(b = array(c(0.5, -0.5)), w = matrix(c(1, 2, 3, 4, 5, 6), 3))
  x <- matrix(c(1, 0, 0, 0, 1, 1), 2, byrow = TRUE)

  layer <- layer_jax_model_wrapper(call_fn = linear_call, params = params)
  expect_true(inherits(layer, "keras_flax._jax_layer.JaxLayer"))
  out <- as_r_array(layer(as_py_array(x)))
  expect_lt(max_abs_difference(out, x %*% params$w + rep(params$b, each = 2)), 1e-6)
  expect_equal(as_r_variables(layer$params), params, tolerance = 1e-7)

  inputs <- keras$Input(shape = tuple(3L))
  outputs <- inputs |> layer_jax_model_wrapper(call_fn = linear_call, params = params)
  expect_equal(outputs$shape, list(NULL, 2L))
})

test_that("layer_jax_model_wrapper refuses a wrong object in R", {
  expect_error(
    layer_jax_model_wrapper("x", call_fn = linear_call),
    "layer_jax_model_wrapper\\(\\): `object` must be"
  )
  expect_error(layer_jax_model_wrapper(), "`call_fn` is missing")
})

test_that("as_r_variables keeps lists and scalars", {
  tree <- reticulate::dict(
    pair = reticulate::tuple(np$ones(2L), np$float32(3)),
    flag = np$array(TRUE)
  )
  converted <- as_r_variables(tree)
  expect_equal(converted$pair[[1]], array(c(1, 1)))
  expect_equal(converted$pair[[2]], 3)
  expect_identical(converted$flag, TRUE)
  expect_equal(reticulate::py_to_r(as_py_array(3)$ndim), 0L)
  expect_equal(reticulate::py_to_r(as_py_array(c(1, 2))$shape), list(2L))
})
