output "public_ip" {
  description = "The appliance's public IPv4 address (its Elastic IP): point site_url's DNS name at it."
  value       = aws_eip.km.public_ip
}

output "public_ipv6" {
  description = "The appliance's IPv6 address, when ipv6_address_count is 1 (else null)."
  value       = try(tolist(aws_network_interface.km.ipv6_addresses)[0], null)
}

output "site_url" {
  description = "Where the appliance answers: site_url when set, else http://<public_ip>."
  value       = var.site_url != null ? var.site_url : "http://${aws_eip.km.public_ip}"
}

output "setup" {
  description = "\"headless\" when a licence was given (the settings are applied at first boot), else \"wizard\": open the setup URL printed on the serial console (EC2: Get system log) and in `journalctl -u km-wizard`."
  # Whether a licence was given is not itself secret.
  value = nonsensitive(local.headless) ? "headless" : "wizard"
}

output "instance_id" {
  description = "ID of the EC2 instance."
  value       = aws_instance.km.id
}

output "ami_id" {
  description = "The AMI the instance was started from."
  value       = aws_instance.km.ami
}

output "security_group_id" {
  description = "ID of the appliance's security group (add rules to it, or reference it from datastores' security groups)."
  value       = aws_security_group.km.id
}

output "user_data" {
  description = "The user data rendered from the current inputs, secrets included: the first-boot shell script (run once by cloud-init) a new instance boots with (`terraform output -raw user_data`)."
  value       = local.user_data
  sensitive   = true
}
