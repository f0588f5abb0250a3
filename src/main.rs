fn main() {
    println!("modelwatch");
}
