# ---------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------

variable "name" {
  description = "Name of the instance (Name tag) and prefix of the security group's name."
  type        = string
  default     = "km"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$", var.name))
    error_message = "name: 1 to 50 letters, digits, '.', '_' or '-', starting with a letter or digit."
  }
}

variable "subnet_id" {
  description = "Subnet the instance is started in; its VPC gets the security group. A public subnet (route to an internet gateway): the appliance serves the internet and needs outbound access."
  type        = string

  validation {
    condition     = can(regex("^subnet-[0-9a-f]+$", var.subnet_id))
    error_message = "subnet_id: a subnet ID such as subnet-0123456789abcdef0."
  }
}

variable "instance_type" {
  description = "EC2 instance type. The embedded datastores want at least 8 GiB of memory; with external MongoDB, Elasticsearch and Redis a smaller type will do."
  type        = string
  default     = "t3.large"
}

variable "ami_id" {
  description = "AMI of the KM appliance. Null: the most recent AMI named like ami_name_pattern owned by ami_owners."
  type        = string
  default     = null

  validation {
    condition     = var.ami_id == null || can(regex("^ami-[0-9a-f]+$", var.ami_id))
    error_message = "ami_id: an AMI ID such as ami-0123456789abcdef0, or null."
  }
}

variable "ami_owners" {
  description = "Owners searched for the AMI when ami_id is null (\"self\": the account running Terraform, where Packer built it; or account IDs)."
  type        = list(string)
  default     = ["self"]

  validation {
    condition     = length(var.ami_owners) > 0
    error_message = "ami_owners: at least one owner."
  }
}

variable "ami_name_pattern" {
  description = "Name filter of the AMI search when ami_id is null."
  type        = string
  default     = "km-appliance-*"
}

variable "root_volume_size" {
  description = "Size of the encrypted gp3 root volume in GiB (at least the AMI's). It holds the embedded datastores."
  type        = number
  default     = 40

  validation {
    condition     = var.root_volume_size >= 8 && floor(var.root_volume_size) == var.root_volume_size
    error_message = "root_volume_size: a whole number of GiB, at least 8."
  }
}

variable "root_volume_kms_key_id" {
  description = "KMS key (ARN) encrypting the root volume. Null: the account's default EBS key."
  type        = string
  default     = null
}

variable "ipv6_address_count" {
  description = "IPv6 addresses given to the instance (the subnet needs an IPv6 range). The security group already admits HTTP and HTTPS over IPv6."
  type        = number
  default     = 0

  validation {
    condition     = contains([0, 1], var.ipv6_address_count)
    error_message = "ipv6_address_count: 0 or 1."
  }
}

variable "key_name" {
  description = "EC2 key pair for SSH (useful only with ssh_cidrs). Null: no key."
  type        = string
  default     = null
}

variable "iam_instance_profile" {
  description = "Instance profile to attach (for example for SSM Session Manager or the CloudWatch agent). Null: none; the appliance itself calls no AWS API."
  type        = string
  default     = null
}

variable "ssh_cidrs" {
  description = "IPv4 and IPv6 ranges allowed to reach SSH (22). Empty: no SSH rule at all. Ranges of the whole internet (/0) are refused."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.ssh_cidrs : can(cidrhost(c, 0))])
    error_message = "ssh_cidrs: every entry must be a CIDR range such as 203.0.113.0/24 or 2001:db8::/48."
  }

  validation {
    condition     = length([for c in var.ssh_cidrs : c if endswith(c, "/0")]) == 0
    error_message = "ssh_cidrs: SSH is not opened to the whole internet; list the administrators' ranges."
  }
}

variable "deletion_protection" {
  description = "Protect the instance against termination through the API (disable_api_termination). Its root volume holds the embedded datastores."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------------------
# The appliance's settings (applied once, at first boot, when licence is set)
# ---------------------------------------------------------------------------------------

variable "licence" {
  description = "KM licence (KM_DEDICATED_KEY). Set: the settings below are applied headless at first boot. Null or empty: nothing is applied and the setup wizard waits for an operator."
  type        = string
  default     = null
  sensitive   = true
}

variable "site_url" {
  description = "KM_SITE_URL: the address people and agents use, such as https://km.example.com. Null: unset (the appliance answers on its IP address)."
  type        = string
  default     = null

  validation {
    condition     = var.site_url == null || can(regex("^https?://[^/\\s]+", var.site_url))
    error_message = "site_url: an http:// or https:// URL such as https://km.example.com."
  }
}

variable "mongo_url" {
  description = "KM_MONGO_URL: an external MongoDB (mongodb:// or mongodb+srv://). Null: the embedded store."
  type        = string
  default     = null
  sensitive   = true
}

variable "elasticsearch_url" {
  description = "KM_ELASTICSEARCH_URL: external Elasticsearch / OpenSearch (http(s)://host:port, several separated by spaces). Null: the embedded store."
  type        = string
  default     = null
  sensitive   = true
}

variable "redis_url" {
  description = "KM_REDIS_URL: an external Redis (redis:// or rediss://). Null: the embedded store."
  type        = string
  default     = null
  sensitive   = true
}

variable "smtp_host" {
  description = "SMTP_HOST: mail server for notifications, host or host:port. Null: no mail."
  type        = string
  default     = null
}

variable "smtp_port" {
  description = "SMTP_PORT. Null: the appliance's default for smtp_tls (465 tls, 587 starttls, 25 none)."
  type        = number
  default     = null

  validation {
    condition     = var.smtp_port == null || try(var.smtp_port >= 1 && var.smtp_port <= 65535 && floor(var.smtp_port) == var.smtp_port, false)
    error_message = "smtp_port: a port number from 1 to 65535."
  }
}

variable "smtp_user" {
  description = "SMTP_USER: SMTP login."
  type        = string
  default     = null
}

variable "smtp_password" {
  description = "SMTP_PASSWORD: SMTP password."
  type        = string
  default     = null
  sensitive   = true
}

variable "smtp_sender" {
  description = "SMTP_SENDER: the From address of notifications."
  type        = string
  default     = null
}

variable "smtp_tls" {
  description = "SMTP_TLS: none, starttls or tls. Null: the appliance's default (starttls)."
  type        = string
  default     = null

  validation {
    condition     = var.smtp_tls == null || contains(["none", "starttls", "tls"], coalesce(var.smtp_tls, "-"))
    error_message = "smtp_tls: none, starttls or tls."
  }
}

variable "km_tls" {
  description = "KM_TLS: off (plain HTTP), acme (a certificate for site_url's host, validated over HTTP-01 on port 80) or files (KM_TLS_CERT and KM_TLS_KEY, through extra_settings). Null: the appliance's default (off)."
  type        = string
  default     = null

  validation {
    condition     = var.km_tls == null || contains(["off", "files", "acme"], coalesce(var.km_tls, "-"))
    error_message = "km_tls: off, files or acme."
  }
}

variable "acme_email" {
  description = "KM_ACME_EMAIL: contact address given to the ACME CA (km_tls = acme)."
  type        = string
  default     = null

  validation {
    condition     = var.acme_email == null || can(regex("^[^@\\s]+@[^@\\s]+$", var.acme_email))
    error_message = "acme_email: an email address."
  }
}

variable "retention_days" {
  description = "KM_RETENTION_DAYS: days of events (metrics, logs, exceptions) kept. Null: the appliance's default (30)."
  type        = number
  default     = null

  validation {
    condition     = var.retention_days == null || try(var.retention_days > 0 && floor(var.retention_days) == var.retention_days, false)
    error_message = "retention_days: a whole number of days, greater than 0."
  }
}

variable "extra_settings" {
  description = "Other appliance settings written with the ones above (not those this module has inputs for), such as KM_TLS_CERT, KM_TLS_KEY, KM_ALLOW_SIGNUP or WIZARD_TEST_MAIL_TO."
  type        = map(string)
  default     = {}
  sensitive   = true

  validation {
    condition     = alltrue([for k in keys(var.extra_settings) : can(regex("^[A-Za-z_][A-Za-z0-9_]*$", k))])
    error_message = "extra_settings: names are letters, digits and '_', not starting with a digit."
  }

  validation {
    condition = length(setintersection(keys(var.extra_settings), [
      "KM_DEDICATED_KEY", "KM_SITE_URL", "KM_MONGO_URL", "KM_ELASTICSEARCH_URL", "KM_REDIS_URL",
      "SMTP_HOST", "SMTP_PORT", "SMTP_USER", "SMTP_PASSWORD", "SMTP_SENDER", "SMTP_TLS",
      "KM_TLS", "KM_ACME_EMAIL", "KM_RETENTION_DAYS",
      "WIZARD_ADMIN_USERNAME", "WIZARD_ADMIN_EMAIL", "WIZARD_ADMIN_PASSWORD",
    ])) == 0
    error_message = "extra_settings: the settings this module has inputs for are set through those inputs."
  }
}

variable "admin_username" {
  description = "WIZARD_ADMIN_USERNAME: the first admin account, created by the headless setup (required with licence)."
  type        = string
  default     = null
}

variable "admin_email" {
  description = "WIZARD_ADMIN_EMAIL: the first admin's email address (required with licence)."
  type        = string
  default     = null

  validation {
    condition     = var.admin_email == null || can(regex("^[^@\\s]+@[^@\\s]+$", var.admin_email))
    error_message = "admin_email: an email address."
  }
}

variable "admin_password" {
  description = "WIZARD_ADMIN_PASSWORD: the first admin's password, at least 8 characters (required with licence). Change it in the dashboard after the first sign-in."
  type        = string
  default     = null
  sensitive   = true

  validation {
    condition     = var.admin_password == null || try(length(var.admin_password) >= 8, false)
    error_message = "admin_password: at least 8 characters."
  }
}
