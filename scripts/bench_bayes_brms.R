# brms's side of scripts/bench_bayes_peers.py: fit one model, print one JSON line.
#
# Usage: Rscript --vanilla bench_bayes_brms.R CSV FORMULA GROUP PRIORS_JSON CHAINS DRAWS
#            WARMUP SEED CORES ADAPT_DELTA
#
# PRIORS_JSON maps brms parameter names (Intercept, b_<x>, sd_<g>__<coef>, cor_<g>,
# sigma) to Stan-style prior strings ("flat" for brms's flat prior), as
# bench_bayes_peers.py resolves them, so every peer samples the same posterior.
suppressPackageStartupMessages({
  library(brms)
  library(posterior)
  library(jsonlite)
})
# Debian's r-cran-bh has no headers (it relies on libboost-dev): tell rstan where Boost is
if (!file.exists(rstan::rstan_options("boost_lib")) && dir.exists("/usr/include/boost")) {
  invisible(rstan::rstan_options(boost_lib = "/usr/include"))
}
a <- commandArgs(trailingOnly = TRUE)
if (length(a) != 10) stop("usage: bench_bayes_brms.R CSV FORMULA GROUP PRIORS CHAINS DRAWS WARMUP SEED CORES ADAPT_DELTA")
csv <- a[1]; formula <- as.formula(a[2]); group <- a[3]
priors <- fromJSON(a[4])
chains <- as.integer(a[5]); draws <- as.integer(a[6]); warmup <- as.integer(a[7])
seed <- as.integer(a[8]); cores <- as.integer(a[9]); adapt_delta <- as.numeric(a[10])
d <- read.csv(csv, colClasses = setNames("character", group))

ps <- list()
for (n in names(priors)) {
  p <- priors[[n]]
  if (p == "flat") next
  if (n == "Intercept") {
    ps[[n]] <- set_prior(p, class = "Intercept")
  } else if (n == "sigma") {
    ps[[n]] <- set_prior(p, class = "sigma")
  } else if (startsWith(n, "b_")) {
    ps[[n]] <- set_prior(p, class = "b", coef = sub("^b_", "", n))
  } else if (startsWith(n, "sd_")) {
    parts <- strsplit(sub("^sd_", "", n), "__", fixed = TRUE)[[1]]
    ps[[n]] <- set_prior(p, class = "sd", group = parts[1], coef = parts[2])
  } else if (startsWith(n, "cor_")) {
    ps[[n]] <- set_prior(p, class = "cor", group = sub("^cor_", "", n))
  } else {
    stop("unknown prior name ", n)
  }
}
prior <- if (length(ps)) do.call(c, unname(ps)) else NULL

el <- function() proc.time()[["elapsed"]]
t0 <- el()
fit0 <- brm(formula, data = d, family = gaussian(), prior = prior, chains = 0, seed = seed,
            silent = 2, refresh = 0)
compile_s <- el() - t0
t1 <- el()
fit <- update(fit0, chains = chains, iter = warmup + draws, warmup = warmup, cores = cores,
              seed = seed, control = list(adapt_delta = adapt_delta), refresh = 0,
              silent = 2, recompile = FALSE)
wall_sample <- el() - t1
dr <- as_draws_array(fit)
glob <- grep("^(b_|sd_|cor_|sigma$)", variables(dr), value = TRUE)
s <- summarise_draws(subset_draws(dr, variable = glob), ess_bulk, ess_tail, rhat)
# plain numbers: summarise_draws gives pillar/vctrs columns, which median() refuses
for (k in c("ess_bulk", "ess_tail", "rhat")) s[[k]] <- as.numeric(s[[k]])
sp <- rstan::get_sampler_params(fit$fit, inc_warmup = TRUE)
et <- rstan::get_elapsed_time(fit$fit)
grads <- sum(sapply(sp, function(m) sum(m[, "n_leapfrog__"])))
post <- (warmup + 1):(warmup + draws)
sampling_s <- wall_sample
out <- list(
  peer = "brms", backend = paste0("rstan ", packageVersion("rstan"), ", brms ", packageVersion("brms")),
  compile_s = compile_s, sampling_s = sampling_s, wall_s = compile_s + wall_sample,
  chain_s = unname(rowSums(et)),
  divergences = sum(sapply(sp, function(m) sum(m[post, "divergent__"]))),
  gradients = grads, gradients_per_draw = grads / (chains * (warmup + draws)),
  us_per_gradient = 1e6 * sum(et) / grads,
  min_ess_bulk = min(s$ess_bulk), median_ess_bulk = median(s$ess_bulk),
  min_ess_tail = min(s$ess_tail), median_ess_tail = median(s$ess_tail),
  max_rhat = max(s$rhat), worst = s$variable[which.min(s$ess_bulk)]
)
cat(toJSON(out, auto_unbox = TRUE, digits = NA), "\n")
