pub mod budget;
pub mod models;
pub mod pricing;
pub mod request;
pub mod routing;
pub mod tokens;
