//! The KM appliance library: every role of `km`, the stores behind them.
