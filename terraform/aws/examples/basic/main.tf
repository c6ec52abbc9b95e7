# A KM appliance on EC2, set up headless at first boot.
#
#   export TF_VAR_licence='km1....'  TF_VAR_admin_password='...'
#   terraform init && terraform apply -var subnet_id=subnet-0123456789abcdef0
#
# Leave TF_VAR_licence unset to finish the setup in the web wizard instead.

terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "subnet_id" {
  description = "A public subnet."
  type        = string
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

  name      = "km"
  subnet_id = var.subnet_id
  # SSH stays closed; ssh_cidrs (and key_name) open it to the administrators' ranges.

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

  tags = {
    Project = "km"
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
