# A KM appliance on Compute Engine, set up headless at first boot.
#
#   export TF_VAR_licence='km1....'  TF_VAR_admin_password='...'
#   terraform init && terraform apply -var project=my-project
#
# Leave TF_VAR_licence unset to finish the setup in the web wizard instead.

terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.0, < 7.0"
    }
  }
}

provider "google" {
  project = var.project
}

variable "project" {
  description = "GCP project holding the km-appliance image family."
  type        = string
}

variable "zone" {
  description = "Zone of the instance."
  type        = string
  default     = "europe-west1-b"
}

variable "licence" {
  description = "KM licence; null: the web wizard."
  type        = string
  default     = null
  sensitive   = true
}

variable "admin_password" {
  description = "Password of the first admin."
  type        = string
  default     = null
  sensitive   = true
}

module "km" {
  source = "../.."

  project   = var.project
  zone      = var.zone
  name      = "km"
  ssh_cidrs = ["203.0.113.0/24"]

  licence        = var.licence
  site_url       = "https://km.example.com"
  km_tls         = "acme"
  acme_email     = "ops@example.com"
  smtp_host      = "smtp.example.com"
  smtp_sender    = "km@example.com"
  retention_days = 30
  admin_username = "admin"
  admin_email    = "ops@example.com"
  admin_password = var.admin_password

  labels = {
    project = "km"
  }
}

output "public_ip" {
  description = "Point km.example.com at this address."
  value       = module.km.public_ip
}

output "site_url" {
  description = "The appliance's address."
  value       = module.km.site_url
}

output "setup" {
  description = "headless or wizard."
  value       = module.km.setup
}
