test_that("the documentation's CNN composes with a Sequential model and fits", {
  data <- random_images(16)
  model <- keras$Sequential(list(keras$Input(shape = tuple(28L, 28L, 1L))))
  module <- MyFlaxModule()

  composed <- withVisible(
    model |> layer_flax_module_wrapper(module = module, seed = 7)
  )

  expect_false(composed$visible)
  expect_equal(reticulate::py_id(composed$value), reticulate::py_id(model))
  expect_length(model$layers, 1)
  layer <- model$layers[[1]]
  before <- as_r_variables(layer$flax_variables)

  model$compile(
    optimizer = keras$optimizers$Adam(1e-3),
    loss = "sparse_categorical_crossentropy"
  )
  history <- model$fit(
    as_py_array(data$x), as_py_array(data$y),
    epochs = 1L, batch_size = 8L, verbose = 0L
  )

  losses <- unlist(history$history$loss)
  expect_length(losses, 1)
  expect_true(is.finite(losses))
  after <- as_r_variables(layer$flax_variables)
  expect_gt(max_abs_difference(
    before$params$Conv_0$kernel, after$params$Conv_0$kernel
  ), 0)
  predicted <- as_r_array(model$predict(as_py_array(data$x), verbose = 0L))
  expect_equal(dim(predicted), c(16L, 10L))
  expected <- module_apply(module, layer$flax_variables, data$x)
  expect_lt(max_abs_difference(predicted, expected), 1e-5)
})

test_that("a Keras tensor gives the output tensor; no object gives the layer", {
  inputs <- keras$Input(shape = tuple(28L, 28L, 1L))
  outputs <- inputs |> layer_flax_module_wrapper(module = MyFlaxModule())
  expect_true(keras$utils$is_keras_tensor(outputs))
  expect_equal(outputs$shape, list(NULL, 10L))
  model <- keras$Model(inputs, outputs)
  expect_length(model$layers, 2)

  layer <- layer_flax_module_wrapper(module = MyFlaxModule(), name = "cnn")
  expect_true(inherits(layer, "keras_flax._flax_layer.FlaxLayer"))
  expect_equal(layer$name, "cnn")
  expect_false(layer$built)
  expect_true(inherits(
    layer_flax_module_wrapper(NULL, module = MyFlaxModule()),
    "keras_flax._flax_layer.FlaxLayer"
  ))
})

test_that("variables given as a named R list round-trip", {
  module <- MyFlaxModule()
  data <- random_images(4)
  initial <- module$init(jax$random$key(3L), as_py_array(data$x))
  variables <- as_r_variables(initial)
  expect_equal(names(variables), "params")
  expect_equal(dim(variables$params$Conv_0$kernel), c(3L, 3L, 1L, 32L))

  layer <- layer_flax_module_wrapper(module = module, variables = variables)
  predicted <- as_r_array(layer(as_py_array(data$x)))

  expect_lt(max_abs_difference(predicted, module_apply(module, initial, data$x)), 1e-6)
  expect_equal(as_r_variables(layer$flax_variables), variables)
})

test_that("a free R function works as `method`, with `training`", {
  Doubler(flax$linen$Module) %py_class% {
    forward <- flax$linen$compact(\(self, left, right, deterministic) {
      x <- jnp$add((flax$linen$Dense(features = 2L))(left), right)
      if (deterministic) x else jnp$multiply(x, 2)
    })
  }
  module <- Doubler()
  wrapper <- function(module, inputs, training) {
    module$forward(inputs[[1]], inputs[[2]], !training)
  }
  left <- as_py_array(matrix(c(1, 2, 3, 4, 5, 6), 2))
  right <- as_py_array(matrix(c(1, 1, 1, 1), 2))
  layer <- layer_flax_module_wrapper(module = module, method = wrapper, seed = 0)

  inference <- as_r_array(layer(list(left, right), training = FALSE))
  training <- as_r_array(layer(list(left, right), training = TRUE))

  expected <- as_r_array(module$apply(
    layer$flax_variables, left, right, TRUE, method = "forward"
  ))
  expect_lt(max_abs_difference(inference, expected), 1e-6)
  expect_lt(max_abs_difference(training, 2 * expected), 1e-6)
})

test_that("a wrong `object` is refused in R, before anything is built", {
  model <- keras$Sequential(list(keras$Input(shape = tuple(28L, 28L, 1L))))
  for (object in list("a string", list(1, 2), keras$layers$Dense(2L))) {
    expect_error(
      layer_flax_module_wrapper(object, module = MyFlaxModule()),
      "`object` must be a Sequential model .* got (an R|a Python)"
    )
  }
  expect_length(model$layers, 0)
  expect_error(layer_flax_module_wrapper(model), "`module` is missing")
  expect_length(model$layers, 0)
})

test_that("other bad arguments give the Python error", {
  expect_error(
    layer_flax_module_wrapper(module = MyFlaxModule(), seed = "a"),
    "seed"
  )
  expect_error(
    layer_flax_module_wrapper(module = "not a module"),
    "module"
  )
  expect_error(
    layer_flax_module_wrapper(
      module = MyFlaxModule(), variables = list(list(kernel = 1))
    ),
    "`variables` must be a named list"
  )
})
