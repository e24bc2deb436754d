library(testthat)
library(kerasflax)
library(reticulate)

test_check("kerasflax")
