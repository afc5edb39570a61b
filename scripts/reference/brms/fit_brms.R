# Fit the brms reference cases and write one JSON per case (and its thinned draws).
#
# Usage:
#   Rscript --vanilla fit_brms.R CASES.json DATA_DIR OUT_DIR [NAME ...]
#       [--chains N] [--iter N] [--warmup N] [--cores N]
#
# CASES.json is the manifest (cases.json beside this script); NAMEs pick cases (default:
# all). --chains/--iter/--warmup override the manifest's (a quick smoke run; the JSON
# records what was run). --cores: chains run in parallel (default 2).
#
# Writes OUT_DIR/<name>.json (summary, priors, ranef, diagnostics, times, versions) and
# OUT_DIR/<name>.draws.json (every thin_draws-th post-warmup draw of each global
# parameter, per chain). Fields are described in scripts/reference/brms/README.md.
suppressPackageStartupMessages({
  library(brms)
  library(posterior)
  library(jsonlite)
})
invisible(Sys.setlocale("LC_COLLATE", "C"))
# Debian's r-cran-bh ships no headers (it depends on libboost-dev instead), so rstan's
# boost_lib option is empty and stan_model() stops with "Boost not found": point it at
# the system's Boost
if (!file.exists(rstan::rstan_options("boost_lib")) && dir.exists("/usr/include/boost")) {
  invisible(rstan::rstan_options(boost_lib = "/usr/include"))
}

argv <- commandArgs(trailingOnly = TRUE)
opt <- list(chains = NA, iter = NA, warmup = NA, cores = 2)
pos <- character()
i <- 1
while (i <= length(argv)) {
  a <- argv[i]
  if (startsWith(a, "--")) {
    key <- substring(a, 3)
    if (!key %in% names(opt)) stop("unknown option ", a)
    opt[[key]] <- as.integer(argv[i + 1])
    i <- i + 2
  } else {
    pos <- c(pos, a)
    i <- i + 1
  }
}
if (length(pos) < 3) stop("usage: fit_brms.R CASES.json DATA_DIR OUT_DIR [NAME ...]")
cases <- read_json(pos[1], simplifyVector = FALSE)
data_dir <- pos[2]
out_dir <- pos[3]
wanted <- pos[-(1:3)]
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)

`%||%` <- function(a, b) if (is.null(a)) b else a
elapsed <- function() proc.time()[["elapsed"]]
sig <- function(x, d = 8) signif(x, d)

versions <- list(
  R = R.version.string,
  brms = as.character(packageVersion("brms")),
  rstan = as.character(packageVersion("rstan")),
  StanHeaders = as.character(packageVersion("StanHeaders")),
  stan = rstan::stan_version(),
  posterior = as.character(packageVersion("posterior"))
)

# brms's prior table (prior_summary / get_prior) as a list of rows; "" is brms's
# empty prior, i.e. flat (improper uniform) -- get_prior() prints it as "(flat)"
prior_rows <- function(ps) {
  ps <- as.data.frame(ps)
  lapply(seq_len(nrow(ps)), function(k) {
    list(
      prior = ps$prior[k], class = ps$class[k], coef = ps$coef[k],
      group = ps$group[k], lb = ps$lb[k], ub = ps$ub[k], source = ps$source[k]
    )
  })
}

summary_of <- function(draws) {
  s <- summarise_draws(
    draws, mean, sd,
    ~ quantile2(.x, probs = c(0.025, 0.05, 0.5, 0.95, 0.975)),
    mcse_mean, mcse_sd, ess_bulk, ess_tail, rhat
  )
  rows <- lapply(seq_len(nrow(s)), function(k) {
    # as.numeric: summarise_draws gives pillar/vctrs numbers, on which signif() ignores
    # its digits
    r <- as.list(s[k, -1])
    lapply(r, function(v) sig(as.numeric(v)))
  })
  names(rows) <- s$variable
  rows
}

fit_case <- function(case) {
  name <- case$name
  group <- case$group
  cls <- setNames("character", group)
  d <- read.csv(file.path(data_dir, case$csv), colClasses = cls)
  chains <- if (is.na(opt$chains)) case$chains else opt$chains
  iter <- if (is.na(opt$iter)) case$iter else opt$iter
  warmup <- if (is.na(opt$warmup)) case$warmup else opt$warmup
  control <- list(adapt_delta = case$adapt_delta, max_treedepth = case$max_treedepth)
  prior <- NULL
  if (!is.null(case$priors)) {
    prior <- do.call(c, lapply(case$priors, function(p) {
      set_prior(p$prior, class = p$class, coef = p$coef %||% "", group = p$group %||% "")
    }))
  }
  f <- as.formula(case$formula)
  message(sprintf("== %s: %s on %s (%d rows), %d chains x %d iter (%d warmup)",
                  name, case$formula, case$csv, nrow(d), chains, iter, warmup))

  t0 <- elapsed()
  fit0 <- brm(f, data = d, family = gaussian(), prior = prior, chains = 0,
              seed = case$seed, silent = 2, refresh = 0)
  compile_s <- elapsed() - t0
  t1 <- elapsed()
  fit <- update(fit0, chains = chains, iter = iter, warmup = warmup, cores = opt$cores,
                seed = case$seed, control = control, refresh = 0, silent = 2,
                recompile = FALSE)
  sample_s <- elapsed() - t1
  message(sprintf("   compile %.1f s, sampling %.1f s", compile_s, sample_s))

  # brms 2.18 does not save the intercept of the mean-centred predictors (the one the
  # Intercept prior is on): add it, Intercept = b_Intercept + sum_k mean(x_k) b_k
  X <- standata(fit)$X
  x_means <- colMeans(X[, colnames(X) != "Intercept", drop = FALSE])
  ddf <- as_draws_df(fit)
  icpt <- ddf$b_Intercept
  for (k in names(x_means)) icpt <- icpt + x_means[[k]] * ddf[[paste0("b_", k)]]
  dr <- as_draws_array(mutate_variables(ddf, Intercept = icpt))
  all_vars <- variables(dr)
  glob <- grep("^(b_|sd_|cor_|sigma$|Intercept$)", all_vars, value = TRUE)
  params <- summary_of(subset_draws(dr, variable = glob))

  # every group's effect: r_<group>[level,coef]
  rvars <- grep(paste0("^r_", group, "\\["), all_vars, value = TRUE)
  rsum <- summary_of(subset_draws(dr, variable = rvars))
  inner <- sub("^[^[]*\\[(.*)\\]$", "\\1", names(rsum))
  lev <- sub(",.*$", "", inner)
  coef <- sub("^[^,]*,", "", inner)
  re <- list()
  for (k in seq_along(rsum)) {
    re[[lev[k]]][[coef[k]]] <- rsum[[k]]
  }
  # the same numbers as ranef(fit) (its Estimate is the mean, Est.Error the sd)
  rf <- ranef(fit)[[group]]
  for (l in dimnames(rf)[[1]]) for (cf in dimnames(rf)[[3]]) {
    stopifnot(abs(rf[l, "Estimate", cf] - re[[l]][[cf]]$mean) <= 1e-6 * (1 + abs(rf[l, "Estimate", cf])))
    stopifnot(abs(rf[l, "Est.Error", cf] - re[[l]][[cf]]$sd) <= 1e-6 * (1 + rf[l, "Est.Error", cf]))
  }

  sf <- fit$fit
  sp <- rstan::get_sampler_params(sf, inc_warmup = TRUE)
  post <- (warmup + 1):iter
  et <- rstan::get_elapsed_time(sf)
  per_chain <- function(fun) sapply(sp, fun)
  leap_w <- per_chain(function(m) sum(m[seq_len(warmup), "n_leapfrog__"]))
  leap_s <- per_chain(function(m) sum(m[post, "n_leapfrog__"]))
  diagnostics <- list(
    divergences = per_chain(function(m) sum(m[post, "divergent__"])),
    treedepth_saturated = per_chain(function(m) sum(m[post, "treedepth__"] >= case$max_treedepth)),
    step_size = sig(per_chain(function(m) m[post[1], "stepsize__"]), 6),
    ebfmi = sig(unname(rstan::get_bfmi(sf)), 6),
    mean_tree_depth = sig(per_chain(function(m) mean(m[post, "treedepth__"])), 6),
    gradients_warmup = leap_w,
    gradients_sampling = leap_s
  )
  times <- list(
    compile_s = round(compile_s, 1),
    sample_wall_s = round(sample_s, 1),
    total_wall_s = round(compile_s + sample_s, 1),
    cores = opt$cores,
    chain_warmup_s = round(unname(et[, "warmup"]), 2),
    chain_sample_s = round(unname(et[, "sample"]), 2),
    us_per_gradient = sig(1e6 * unname(et[, "warmup"] + et[, "sample"]) / (leap_w + leap_s), 4)
  )
  ess_s <- min(sapply(params[setdiff(names(params), "Intercept")], function(p) p$ess_bulk))

  # the response as brms's default priors see it (def_scale_prior: after any transform
  # written in the formula's left-hand side)
  y <- unname(model.response(model.frame(brmsterms(fit$formula)$respform, d)))
  out <- list(
    name = name,
    about = case$about,
    data = case$csv,
    formula = case$formula,
    family = "gaussian(identity)",
    n = nrow(d),
    n_groups = length(unique(d[[group]])),
    group = group,
    priors_given = case$priors,
    priors = prior_rows(prior_summary(fit)),
    default_priors = prior_rows(get_prior(f, data = d, family = gaussian())),
    response = list(median = median(y), mad = mad(y)),
    predictor_means = as.list(x_means),
    sampler = list(
      algorithm = "NUTS (rstan, diag_e)", chains = chains, iter = iter, warmup = warmup,
      draws_per_chain = iter - warmup, thin = 1, seed = case$seed,
      adapt_delta = case$adapt_delta, max_treedepth = case$max_treedepth, init = "random"
    ),
    versions = versions,
    times = times,
    min_ess_bulk_per_s = sig(ess_s / sample_s, 4),
    diagnostics = diagnostics,
    parameters = params,
    ranef = setNames(list(re), group)
  )
  write(toJSON(out, auto_unbox = TRUE, pretty = TRUE, digits = NA, null = "null", na = "null"),
        file.path(out_dir, paste0(name, ".json")))

  thin <- case$thin_draws
  keep <- seq(thin, iter - warmup, by = thin)
  dl <- lapply(glob, function(v) {
    a <- extract_variable_matrix(dr, v)
    lapply(seq_len(ncol(a)), function(ch) sig(unname(a[keep, ch]), 7))
  })
  names(dl) <- glob
  draws <- list(
    name = name, data = case$csv, formula = case$formula, thin = thin,
    chains = chains, draws_per_chain = length(keep),
    about = "every thin-th post-warmup draw per chain (7 significant digits), brms's names; Intercept is the intercept of the mean-centred predictors",
    draws = dl
  )
  write(toJSON(draws, auto_unbox = TRUE, pretty = TRUE, digits = NA),
        file.path(out_dir, paste0(name, ".draws.json")))

  worst <- max(sapply(params, function(p) p$rhat))
  message(sprintf("   divergences %d, max rhat %.4f, min bulk ESS %.0f",
                  sum(diagnostics$divergences), worst, ess_s))
}

for (case in cases) {
  if (length(wanted) && !case$name %in% wanted) next
  fit_case(case)
}
